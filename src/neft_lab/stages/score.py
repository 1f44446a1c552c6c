"""`stage=score`: a score for every neuron vector of the model (cached), from the reference run or a scorer
that needs none; prints the `stage=select` command that goes on from them."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

logger = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    from neft_lab.selection_workflow import check_chain_stage  # imports torch: only for this stage

    check_chain_stage(cfg, "score")


def run(cfg: DictConfig, run_dir: Path | None = None) -> None:
    from neft_lab import chain

    out = chain.scores(cfg)
    logger.info(
        "scores: %s\nnext, select a neuron set from them: %s",
        out,
        chain.next_command(
            ["stage=select", f"selection.scores={Path(out).absolute()}"], ("stage", "selection.scores")
        ),
    )
