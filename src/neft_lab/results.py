"""Read finished runs back: one flat row per run folder, for notebooks, reports and sweeps."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)


def main_metric(metrics: dict[str, Any] | None) -> float | None:
    """The main test metric of an evaluation's results (what a run hands a Hydra sweeper): COMET, else BLEU,
    ROUGE-L, chrF or IFEval's prompt-level strict accuracy."""
    if not metrics:
        return None
    for key in ("comet", "bleu", "rougeL", "chrf", "ifeval_prompt_strict"):
        if metrics.get(key) is not None:
            return float(metrics[key])
    return None


# row key → config key: what a run was asked to do, beside what metrics.json says it did
SETTINGS = {
    "stage": "stage",
    "strategy_name": "strategy.name",
    "task_kind": "task.kind",
    "experiment_name": "experiment_name",
    "selection_name": "selection.name",
    "selection_method": "selection.method",
    "scorer": "selection.scorer",  # the selection settings that define a NeFT method (metrics.json records them
    "pooling": "selection.pooling",  # as `selection_settings` since issue 19; these are for older runs)
    "modules": "selection.modules",
    "reference_steps": "selection.reference.steps",
    "reference_horizon": "selection.reference.horizon",
    "budget_kind": "selection.budget.kind",
    "budget_value": "selection.budget.value",
    "reverse_share": "selection.reverse_share",
    "selection_file": "selection.file",
    "budget_share": "budget",  # the top-level budget (LoRA r=match matches it)
    "target_lang": "task.target_lang",  # how BLEU was tokenized (stage=report's significance tests rescore it)
    "bleu_lowercase": "task.bleu_lowercase",
}


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every `metrics.json` under `root`, flattened (`after.bleu` → `after_bleu`), with its run's key settings.

    A `metrics.json` that cannot be parsed is skipped with a warning (runs write it atomically, so
    this is a file edited or copied by hand).
    """
    rows = []
    for metrics_file in sorted(Path(root).rglob("metrics.json")):
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning("skipping %s: not readable JSON (%s)", metrics_file, err)
            continue
        if not isinstance(metrics, dict):
            logger.warning("skipping %s: not a JSON object", metrics_file)
            continue
        row: dict[str, Any] = {"run_dir": str(metrics_file.parent)}
        for key, value in metrics.items():
            if isinstance(value, dict):
                row.update({f"{key}_{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
                row.update(  # a list of names (selection_settings.modules) as one comma-separated value
                    {
                        f"{key}_{k}": ",".join(map(str, v))
                        for k, v in value.items()
                        if isinstance(v, list) and all(isinstance(x, (str, int)) for x in v)
                    }
                )
            else:
                row[key] = value
        if row.get("train_steps") and row.get("train_step_seconds_median") is None:
            from neft_lab.curves import logged_step_seconds

            row["train_step_seconds_median"] = logged_step_seconds(metrics_file.parent)
        config_file = metrics_file.parent / "config.yaml"
        if config_file.exists():
            cfg = OmegaConf.load(config_file)
            row.update(
                {
                    "lr": OmegaConf.select(cfg, "optim.lr"),
                    "steps_configured": OmegaConf.select(cfg, "trainer.max_steps"),
                    "batch_size": OmegaConf.select(cfg, "loader.batch_size"),
                    "group_by_length": bool(OmegaConf.select(cfg, "loader.group_by_length", default=False)),
                }
            )
            if "strategy" in cfg and "r" in cfg.strategy and not isinstance(row.get("lora_r"), int):
                row["lora_r"] = (
                    cfg.strategy.r
                )  # metrics.json holds the rank actually used (r=match resolves it)
            row.update(_settings(cfg))
        rows.append(row)
    return rows


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """The SETTINGS present in this run's config (older runs lack some; selection=none has no budget)."""
    out = {}
    for key, path in SETTINGS.items():
        value = OmegaConf.select(cfg, path, default=None, throw_on_resolution_failure=False)
        if value is not None:
            out[key] = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    return out
