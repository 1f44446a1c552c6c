"""`stage=analyze`: the paper's §6 analysis of how neurons changed (utilization, ΔRank, overlaps), written
to its analysis folder (`analysis.out`) by `neft_lab.analysis.stage`: no run folder of its own."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from neft_lab.config_checks import check_threads


def check(cfg: DictConfig) -> None:
    from neft_lab.analysis.stage import settings  # run folders, neuron sets and their fit, analysis.* values

    check_threads(cfg)
    settings(cfg)


def run(cfg: DictConfig, run_dir: Path | None = None) -> None:
    from neft_lab.analysis.stage import analyze

    analyze(cfg)
