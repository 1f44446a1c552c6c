"""What a run folder already holds decides what a new command in it may do: never mix two runs.

- A finished run (its `metrics.json` is written last, atomically) is left alone: rerunning the same
  command says so and exits 0 without touching anything.
- A folder started with another config refuses to continue, naming the keys that differ.
- `resume=false` starts over in the folder, removing the earlier run's results first.
- One job at a time: a job holds a lock on its folder (`RunFolderLock`); a second one refuses in one line.
- `.hydra/` is written only once the check passed (`save_hydra_files`): a refused or no-op rerun leaves it.
- A saved run is data: reading one back never instantiates a class it names outside neft_lab's own configs
  nor enables `trust_remote_code` (`check_saved_config`); a copied or moved folder resumes into itself
  (`moved_to`); what a killed write left is removed by the next job (`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
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
    "trainer.enable_progress_bar", "eval.show", "eval.log_predictions", "model.cache_dir",
)  # fmt: skip
# What an earlier run left that a new one would pick up (resume, restore-best, reports; csv: the training log,
# appended to across resumes).
RESULTS = ("checkpoints", "export", METRICS, "predictions.jsonl", "neuron_set.safetensors", "neuron_set.json",
           "neft_delta.safetensors", "csv")  # fmt: skip


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
        differences = _saved_differences(saved_file, resolved)
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


def _saved_differences(saved_file: Path, resolved: dict[str, Any]) -> list[str]:
    return config_differences(OmegaConf.to_container(OmegaConf.load(saved_file)), resolved)


def finished_unchanged(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The metrics of the finished run in `run_dir` when `cfg` (a fit, `resume` not false) would find nothing
    to do there (what `prepare` returns); None otherwise. Reads only: a launcher asks before starting a job."""
    fresh = str(cfg.get("resume", "auto")).lower() in ("false", "none", "never")
    saved_file = run_dir / CONFIG
    if fresh or cfg.get("stage") != "fit" or not saved_file.exists():
        return None
    metrics = finished_metrics(run_dir)
    if metrics is None or _saved_differences(saved_file, OmegaConf.to_container(cfg, resolve=True)):
        return None
    return metrics


# ------------------------------------------------------------------------------------------------
# A saved run is data: reading it never runs code it names


@functools.lru_cache(maxsize=1)
def _project_targets() -> frozenset[str]:
    """Every `_target_` the project's own configs (conf/) and strategy registry name."""
    from neft_lab.config import conf_dir
    from neft_lab.strategies import REGISTRY

    found = {f"{cls.__module__}.{cls.__qualname__}" for cls in REGISTRY.values()}
    for file in conf_dir().rglob("*.yaml"):
        found.update(re.findall(r"^\s*_target_:\s*['\"]?([\w.]+)", file.read_text(), flags=re.M))
    return frozenset(found)


def _targets(node: Any, prefix: str = "") -> dict[str, str]:
    """`key: class` for every `_target_` below `node` (a plain container)."""
    found: dict[str, str] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                found[f"{prefix}_target_"] = str(value)
            else:
                found.update(_targets(value, f"{prefix}{key}."))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(_targets(value, f"{prefix}{i}."))
    return found


def check_saved_config(saved: Any, command: Any, source: Path, keys: tuple[str, ...] | None = None) -> None:
    """Refuse a saved run config (`source`, e.g. a foreign `config.yaml`) that would run code when read back:
    a `_target_` that neither the project's configs nor this command name at that key, or
    `model.trust_remote_code: true` that this command does not pass. `keys`: only these parts are read."""
    saved = OmegaConf.to_container(saved, resolve=False) if isinstance(saved, DictConfig) else saved
    trusted = bool(OmegaConf.select(command, "model.trust_remote_code", default=False))
    command = OmegaConf.to_container(command, resolve=False)
    if not isinstance(saved, dict):
        raise ConfigError(f"{source} is not a run config (a mapping of settings): give the folder of a run")
    parts = {k: saved.get(k) for k in keys} if keys is not None else saved
    allowed = _project_targets()
    mine = _targets(command)
    for key, target in _targets(parts).items():
        if target not in allowed and mine.get(key) != target:
            raise ConfigError(
                f"{source} sets {key}={target}, a class neft_lab does not provide: a saved run never instantiates "
                f"a class named in it. If you trust it, pass {key}={target} on the command line"
            )
    trust = (
        (saved.get("model") or {}).get("trust_remote_code") if isinstance(saved.get("model"), dict) else None
    )
    if trust and not trusted:
        raise ConfigError(
            f"{source} sets model.trust_remote_code=true: a saved run never enables it (its folder's .py files "
            "would run). If you trust that code, pass model.trust_remote_code=true on the command line"
        )


def moved_to(saved: DictConfig, folder: Path) -> DictConfig:
    """The saved config of the run now in `folder` (copied or moved there): `paths.run_dir` and every path below
    the old run folder (checkpoint dirpaths, the CSV logger's save_dir, ...) point into `folder`."""
    data = OmegaConf.to_container(saved, resolve=False)
    old = str(((data.get("paths") or {}) if isinstance(data, dict) else {}).get("run_dir") or "").rstrip("/")
    new = str(folder)

    def moved(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: moved(v) for k, v in node.items()}
        if isinstance(node, list):
            return [moved(v) for v in node]
        if old and isinstance(node, str) and (node == old or node.startswith(old + "/")):
            return new + node[len(old) :]
        return node

    data = moved(data)
    data.setdefault("paths", {})["run_dir"] = new
    return OmegaConf.create(data)


# ------------------------------------------------------------------------------------------------
# One job per run folder, and what a killed one left


_HELD: set[int] = set()  # descriptors holding a run folder's lock in this process


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so that the lock ends with
    the job that took it and never lives on in a leftover worker."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunFolderLock:
    """An exclusive `flock` on the run folder itself (no lock file: a no-op rerun touches nothing), held while
    a job works in it; released when the process ends, however it ends."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"another job is running in {self.run_dir}: wait for it to end (or stop it), or choose "
                    "another hydra.run.dir"
                ) from None
            logger.debug("cannot lock %s (%s): going on without a lock", self.run_dir, err)
            return self
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


# atomic_file's `.<name>.<random>.tmp`, atomic_dir's `.<name>.<random>.tmp/` and `.<name>.old/`, the checkpoint
# link's `.<name>.link-tmp`: what a kill in the middle of a write leaves behind
LEFTOVER = re.compile(r"^\..+\.(?:\w+\.tmp|old|link-tmp)$")


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temporary files and folders of writes a killed job left in `run_dir` (call under the lock)."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if LEFTOVER.match(path.name):
                shutil.rmtree(
                    path, ignore_errors=True
                ) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        logger.info("removed what an interrupted write left: %s", ", ".join(str(p) for p in removed))
    return removed


def save_hydra_files(folder: Path, cfg: DictConfig) -> None:
    """Hydra's `.hydra/` (config, hydra, overrides), written once the command's check of the folder passed:
    `hydra.output_subdir` is null, so a refused or no-op rerun leaves the folder's record as it was."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not inside a Hydra job
        return
    out = folder / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(out / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    atomic_write_text(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


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


# ------------------------------------------------------------------------------------------------
# A command that failed: its folder and its log

# They write elsewhere (the selection stages: into the cache, stage=select to selection.out): the folder Hydra
# made for them is removed.
NO_FOLDER_STAGES = ("report", "export", "analyze", "reference", "score", "select")


def after_failure(err: BaseException, cfg: DictConfig, folder: Path, output_dir: Path, keep: bool) -> None:
    if isinstance(err, SystemExit) and err.code in (0, None):
        return
    if OmegaConf.select(cfg, "stage") in NO_FOLDER_STAGES:  # no folder, failed or not: the error says it all
        discard(folder, output_dir)
        return
    log = (None if keep else set_aside_failed(folder, output_dir)) or run_log(folder)
    if log is None:
        return
    if isinstance(err, ConfigError) and err.args:  # the CLI prints it as one line: name the log there
        err.args = (f"{err.args[0]} (log: {log})", *err.args[1:])
    else:
        err.add_note(f"log: {log}")


def log_to_run_log(level: int, message: str) -> None:
    """Write `message` to the command's log file only (the console shows it once, on stderr)."""
    record = logging.getLogger("neft_lab").makeRecord("neft_lab", level, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
