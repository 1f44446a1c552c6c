"""Checkpoints that survive clusters: atomic writes, safe loads, validated resume, a save on preemption.

- Lightning's `TorchCheckpointIO` writes through an fsspec transaction that stages the file in
  `$TMPDIR` and *moves* it: across filesystems that is a copy, and a kill or a full disk during it
  leaves a truncated `last.ckpt` that looks complete. `AtomicCheckpointIO` writes beside the target,
  fsyncs and renames (`neft_lab.io.atomic_file`).
- Every checkpoint is loaded with `weights_only=True` (a crafted `.ckpt` cannot run code), after the CRC32
  of every member of its zip is checked (torch itself would read damaged tensor bytes silently).
- `resumable_checkpoint` checks that `last.ckpt` loads before resuming from it and otherwise falls
  back to the newest checkpoint that does, saying so.
- `PreemptionCheckpoint` saves `last.ckpt` when Lightning stops on SIGTERM (SIGUSR1 is treated alike
  outside SLURM, where Lightning's auto-requeue owns it), so a preempted job loses at most one step.
"""

from __future__ import annotations

import logging
import os
import signal
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_file

logger = logging.getLogger(__name__)

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary sibling, fsync, rename; `torch.load(weights_only=True)`.

    One step, one file: Lightning writes `last.ckpt` before validation and the new best checkpoint after
    it, at the same step — two full copies of one state. When the best follows `last.ckpt` at the same
    step, `last.ckpt` becomes a second name (a hard link) of the best file, whose state is the later one
    (it already records itself as the best). Every later write replaces a name by rename, so the other
    name keeps its file; damage done *in place* to that one file would reach both names (docs: README,
    "Reliability"). Where the filesystem has no hard links, the two copies stay.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_written: tuple[Path, int] | None = None  # last.ckpt written by this process, at this step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        with atomic_file(path, "wb") as handle:
            torch.save(checkpoint, handle)
        step = int(checkpoint.get("global_step", -1))
        if path.name == LAST:
            self._last_written = (path, step)
        elif self._last_written == (path.parent / LAST, step):
            _link_over(path, path.parent / LAST)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path, map_location or "cpu")


def _link_over(source: Path, target: Path) -> None:
    """Make `target` a hard link to `source`, atomically (link beside it, then rename over it)."""
    tmp = target.with_name(f".{target.name}.link-tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError as err:  # no hard links here (some network filesystems): keep both copies
        tmp.unlink(missing_ok=True)
        logger.debug("cannot link %s to %s (%s): keeping both copies", target.name, source.name, err)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint of this project, loaded without unpickling code; a clear error if it is broken."""
    path = Path(path)
    try:
        _check_crc(path)
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # truncated zip, garbage, or a pickle that needs code (weights_only refuses it)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"checkpoint {path} cannot be read safely ({type(err).__name__}{': ' + reason if reason else ''}); it "
            "is truncated, corrupted or not a checkpoint of this project: use another checkpoint of the run or retrain"
        ) from None


def _check_crc(path: Path) -> None:
    """torch reads a damaged tensor without complaint; the zip's CRC32 of every member does not lie."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"{bad} fails its CRC check")


def _readable(path: Path) -> dict[str, Any] | None:
    try:
        return load_checkpoint(path)
    except ConfigError:
        return None


def resumable_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint to resume from, checked and with its saved paths pointing into this folder.

    `last.ckpt` if it loads, else the newest readable checkpoint of the folder (with a warning), else None.
    Lightning records absolute paths (best model, top-k, last): a copied or moved run folder would restore,
    compare against or export the *old* folder's files, so they are re-pointed here (names kept).
    """
    last = checkpoints / LAST
    if not last.exists():
        return None
    path, state = last, _readable(last)
    if state is None:
        steps = [
            (int(s.get("global_step", -1)), p)
            for p in checkpoints.glob("*.ckpt")
            if p != last and (s := _readable(p))
        ]
        if not steps:
            raise ConfigError(
                f"{last} is truncated or corrupted and no other checkpoint in {checkpoints} is readable: "
                "start over with resume=false (this removes the broken checkpoints)"
            )
        step, path = max(steps)
        logger.warning(
            "%s is truncated or corrupted: resuming from %s (step %d) instead", last, path.name, step
        )
        state = load_checkpoint(path)
    _relocate(path, state, checkpoints)
    return path


def _relocate(checkpoint: Path, state: dict[str, Any], checkpoints: Path) -> None:
    moved = False
    for callback_state in (state.get("callbacks") or {}).values():
        old = callback_state.get("dirpath") if isinstance(callback_state, dict) else None
        if not old or Path(old) == checkpoints:
            continue
        moved = True
        here = {key: str(checkpoints / Path(value).name) if value else value
                for key, value in callback_state.items() if key.endswith("_path") and isinstance(value, str)}  # fmt: skip
        callback_state.update(here, dirpath=str(checkpoints))
        if isinstance(callback_state.get("best_k_models"), dict):
            callback_state["best_k_models"] = {
                str(checkpoints / Path(k).name): v for k, v in callback_state["best_k_models"].items()
            }
    if moved:
        logger.info(
            "the run folder moved: checkpoint paths in %s now point into %s", checkpoint.name, checkpoints
        )
        with atomic_file(checkpoint, "wb") as handle:
            torch.save(state, handle)


def best_checkpoint(checkpoints: Path, recorded: str | None) -> Path | None:
    """The best checkpoint *of this run folder*: the recorded path is absolute and may name another folder
    (a run folder copied or moved keeps its old paths inside `last.ckpt`), so only its file name counts."""
    if not recorded:
        return None
    own = checkpoints / Path(recorded).name
    if own.exists():
        return own
    logger.warning(
        "the best checkpoint %s is not in %s: keeping the last weights", Path(recorded).name, checkpoints
    )
    return None


def check_writable(folder: Path) -> None:
    """Fail before training when checkpoints cannot be written (Lightning would only log and go on)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / ".write-test", "wb") as handle:
            handle.write(b"ok")
        (folder / ".write-test").unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write checkpoints to {folder} ({err.strerror or err}): free the disk, fix the permissions, "
            "or choose another hydra.run.dir"
        ) from None


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (and SIGUSR1 outside SLURM) save `<checkpoints>/last.ckpt` at the step boundary where
    Lightning stops; the pipeline then exits non-zero and prints how to resume."""

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = Path(checkpoints)
        self.saved: Path | None = None
        self._previous_usr1: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "SLURM_JOB_ID" not in os.environ and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            self._previous_usr1 = signal.signal(signal.SIGUSR1, _as_sigterm)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if not (trainer.received_sigterm or isinstance(exception, KeyboardInterrupt)):
            return
        if trainer.checkpoint_callback is None or trainer.global_step == 0:
            return
        self.saved = self.checkpoints / LAST
        trainer.save_checkpoint(self.saved)
        logger.warning("stopped at step %d: saved %s", trainer.global_step, self.saved)

    def _restore(self) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None


def _as_sigterm(signum: int, frame: Any) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
