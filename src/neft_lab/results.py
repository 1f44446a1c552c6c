"""Read finished runs back: one flat row per run folder, for notebooks, reports and sweeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every `metrics.json` under `root`, flattened (`after.bleu` → `after_bleu`), with its run's key settings."""
    rows = []
    for metrics_file in sorted(Path(root).rglob("metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        row: dict[str, Any] = {"run_dir": str(metrics_file.parent)}
        for key, value in metrics.items():
            if isinstance(value, dict):
                row.update({f"{key}_{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
            else:
                row[key] = value
        config_file = metrics_file.parent / "config.yaml"
        if config_file.exists():
            cfg = OmegaConf.load(config_file)
            row.update(
                {
                    "lr": cfg.optim.lr,
                    "steps_configured": cfg.trainer.max_steps,
                    "batch_size": cfg.loader.batch_size,
                }
            )
            if "r" in cfg.strategy:
                row["lora_r"] = cfg.strategy.r
        rows.append(row)
    return rows
