"""`stage=report`: the table of finished runs (mean ± std over seeds, paired tests against a baseline) and
their convergence curves, read back from their folders (`neft_lab.report`): no model, no run folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def check(cfg: DictConfig) -> None:
    from neft_lab.report import report_root

    report_root(cfg)


def run(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    from neft_lab.report import report

    return report(cfg)
