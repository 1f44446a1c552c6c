"""`stage=reference`: NeFT's short full fine-tune that the scores are computed from, run apart (cached)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

logger = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    from neft_lab.selection_workflow import check_chain_stage  # imports torch: only for this stage

    check_chain_stage(cfg, "reference")


def run(cfg: DictConfig, run_dir: Path | None = None) -> None:
    from neft_lab import chain

    logger.info("reference model: %s", chain.reference(cfg))
