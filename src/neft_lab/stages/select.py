"""`stage=select`: a neuron set from scores and a budget, written to a file a NeFT fit trains
(`selection=from_file`); prints that command."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

logger = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    from neft_lab.selection_workflow import check_chain_stage  # imports torch: only for this stage

    check_chain_stage(cfg, "select")


def run(cfg: DictConfig, run_dir: Path | None = None) -> None:
    from neft_lab import chain

    out = chain.select_to_file(cfg)
    logger.info(
        "neuron set: %s\ntrain on it: %s",
        out,
        chain.next_command(
            ["strategy=neft", "selection=from_file", f"selection.file={Path(out).absolute()}"],
            ("stage", "strategy", "selection"),
        ),
    )
