"""What a run folder already holds decides what a new command in it may do: never mix two runs.

- A finished run (its `metrics.json` is written last, atomically) is left alone: rerunning the same
  command says so and exits 0 without touching anything.
- A folder started with another config refuses to continue, naming the keys that differ.
- `resume=false` starts over in the folder, removing the earlier run's results first.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_write_text

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.json"
# Keys that may differ between the commands of one run: how it is shown, logged and where it runs from.
MAY_DIFFER = (
    "resume", "threads", "paths", "logger", "callbacks", "experiment_name",
    "trainer.enable_progress_bar", "eval.show", "eval.log_predictions",
)  # fmt: skip
# What an earlier run left that a new one would pick up (resume, restore-best, reports).
RESULTS = ("checkpoints", "export", METRICS, "predictions.jsonl", "neuron_set.safetensors", "neuron_set.json",
           "neft_delta.safetensors")  # fmt: skip


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: saved → new` for every leaf that differs, ignoring MAY_DIFFER."""
    a, b = _flat(saved), _flat(new)

    def ignored(key: str) -> bool:
        return any(key == k or key.startswith(f"{k}.") for k in MAY_DIFFER)

    keys = sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [f"{k}: {a.get(k, '<unset>')!r} → {b.get(k, '<unset>')!r}" for k in keys]


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METRICS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Check the folder against the new command; returns the finished run's metrics when there is nothing to do.

    Writes `config.yaml` otherwise (so it always describes what the folder holds).
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    fresh = str(cfg.get("resume", "auto")).lower() in ("false", "none", "never")
    saved_file = run_dir / CONFIG
    if fresh:
        removed = [name for name in RESULTS if (run_dir / name).exists()]
        for name in removed:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if removed:
            logger.info(
                "resume=false: starting over in %s (removed the earlier %s)", run_dir, ", ".join(removed)
            )
    elif saved_file.exists():
        differences = config_differences(OmegaConf.to_container(OmegaConf.load(saved_file)), resolved)
        if differences:
            shown = "; ".join(differences[:6]) + (
                f"; ... ({len(differences)} keys)" if len(differences) > 6 else ""
            )
            raise ConfigError(
                f"{run_dir} holds a run started with another config ({shown}). Rerun with its settings to "
                "continue it, pass resume=false to start over in this folder, or choose another hydra.run.dir"
            )
        if cfg.stage == "fit" and (metrics := finished_metrics(run_dir)) is not None:
            logger.info(
                "%s is a finished run (%s): nothing to do. Pass resume=false to train it again, or choose "
                "another hydra.run.dir",
                run_dir,
                run_dir / METRICS,
            )
            return metrics
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_file, OmegaConf.to_yaml(cfg, resolve=True))
    return None
