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
# Keys that may differ between the commands of one run: how it is shown, logged and where it runs from, and the
# settings of other stages (stage=analyze, stage=report), which fit never reads.
MAY_DIFFER = (
    "resume", "threads", "paths", "logger", "callbacks", "experiment_name", "sweep_objective", "analysis", "report",
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

    # a key the saved config lacks came with a newer neft_lab: the run continues with its default
    keys = sorted(k for k in a if not ignored(k) and k in b and a[k] != b[k]) + sorted(
        k for k in a if not ignored(k) and k not in b
    )
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


# What Hydra leaves in the folder of every command: a command that failed (or `stage=report`, or
# `resume=<folder>`, which works on in <folder>) leaving only these made nothing that looks like a result.
BOOKKEEPING = (".hydra", CONFIG)


def hydra_output_dir() -> Path | None:
    """The folder Hydra made for this command (None outside a Hydra job: tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def holds_no_result(folder: Path) -> bool:
    """Nothing in `folder` but Hydra's `.hydra/`, the command's log and `config.yaml`."""
    return folder.is_dir() and all(p.name in BOOKKEEPING or p.suffix == ".log" for p in folder.iterdir())


def run_log(folder: Path) -> Path | None:
    """The log file the root logger writes into `folder` (Hydra's `<job name>.log`), if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder.resolve():
            return Path(handler.baseFilename)
    return None


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    """rmdir `folder` and its parents while empty, up to and including `stop` (never above it)."""
    stop = stop.resolve()
    folder = folder.resolve()
    while folder == stop or stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone)
            return
        if folder == stop:
            return
        folder = folder.parent


def set_aside_failed(folder: Path, output_dir: Path) -> Path | None:
    """Move a failed command's folder below `output_dir` that holds no result to `<output_dir>/failed/<its path
    below output_dir>` (a folder elsewhere, chosen with hydra.run.dir=, stays).

    Returns where its log is now (None when the folder holds results and stays where it is). The log
    file stays open across the move (same file system: the open file follows), so what the command
    still logs lands in the moved copy.
    """
    if not holds_no_result(folder):
        return None
    log = run_log(folder)
    try:
        relative = folder.resolve().relative_to(output_dir.resolve())
    except ValueError:  # a folder the user chose (hydra.run.dir=...) stays where it is
        return None
    target = output_dir / "failed" / relative
    while target.exists():
        target = target.with_name(target.name + "+")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and log is not None and Path(handler.baseFilename) == log:
            handler.baseFilename = str((target / log.name).resolve())
    _remove_empty_parents(folder.parent, output_dir)
    return target / log.name if log is not None else target


def _detach_logs(folder: Path) -> list[logging.FileHandler]:
    root = logging.getLogger()
    detached = [
        h
        for h in root.handlers
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == folder.resolve()
    ]
    for handler in detached:
        root.removeHandler(handler)
        handler.close()
    return detached


def discard(folder: Path, output_dir: Path) -> None:
    """Remove the folder Hydra made for a command that leaves nothing in it (`stage=report`)."""
    if not holds_no_result(folder):
        return
    _detach_logs(folder)
    shutil.rmtree(folder, ignore_errors=True)
    _remove_empty_parents(folder.parent, output_dir)


def continue_log_in(folder: Path, run_dir: Path, output_dir: Path) -> None:
    """`resume=<run_dir>`: log into `<run_dir>/<log name>` (appending) and remove the folder Hydra made."""
    if folder.resolve() == run_dir.resolve() or not holds_no_result(folder):
        return
    root = logging.getLogger()
    for old in _detach_logs(folder):
        handler = logging.FileHandler(run_dir / Path(old.baseFilename).name, mode="a", encoding="utf-8")
        handler.setFormatter(old.formatter)
        handler.setLevel(old.level)
        root.addHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)
    _remove_empty_parents(folder.parent, output_dir)


def eval_label(ckpt: Any) -> str:
    """What `stage=eval` scores, for its folder's name: the run's path below `runs/` (`<task>-<strategy>-<time>`)
    when it is one, else the last two parts of the path; `.ckpt` dropped."""
    if not ckpt:
        return "no-ckpt"
    parts = [p for p in Path(str(ckpt)).expanduser().parts if p not in ("/", ".", "..")]
    parts = parts[len(parts) - parts[::-1].index("runs") :] if "runs" in parts else parts[-2:]
    label = "-".join(parts)
    return label[: -len(".ckpt")] if label.endswith(".ckpt") else label


def command_dir(stage: Any, task: Any, strategy: Any, ckpt: Any, time: Any) -> str:
    """`hydra.run.dir` below paths.output_dir, named after what runs: `runs/<task>/<strategy>/<time>` (fit),
    `evals/<time>-<what is scored>` (eval; its strategy is the scored run's), `reports/<time>` (report:
    removed when it ends)."""
    if stage == "eval":
        return f"evals/{time}-{eval_label(ckpt)}"
    if stage == "report":
        return f"reports/{time}"
    return f"runs/{task}/{strategy}/{time}"
