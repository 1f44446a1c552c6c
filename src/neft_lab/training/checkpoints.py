"""Checkpoints that survive clusters: atomic writes, safe loads, validated resume, a save on preemption.

- Lightning's `TorchCheckpointIO` writes through an fsspec transaction that stages the file in
  `$TMPDIR` and *moves* it: across filesystems that is a copy, and a kill or a full disk during it
  leaves a truncated `last.ckpt` that looks complete. `AtomicCheckpointIO` writes beside the target,
  fsyncs and renames (`neft_lab.io.atomic_file`).
- Every checkpoint is loaded with `weights_only=True` (a crafted `.ckpt` cannot run code), after the CRC32
  of every member of its zip is checked (torch itself would read damaged tensor bytes silently).
- `resumable_checkpoint` checks that `last.ckpt` loads before resuming from it and otherwise falls
  back to the newest checkpoint that does, saying so.
- Stopping on SIGTERM/SIGUSR1/Ctrl-C at a step boundary, with `last.ckpt` saved there, is
  `training.stops.StepBoundaryStop`.
"""

from __future__ import annotations

import logging
import os
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

    One step, one file: `last.ckpt` and a new best checkpoint of the same step are two full copies of one
    state. `last.ckpt` becomes a second name (a hard link) of the best file: written after the best (a step
    with a validation: `training.stops.LastCheckpoint`), it is linked instead of written; written before it
    (a stop at that step), it is replaced by a link to the best file, whose state is the later one (it
    already records itself as the best). Every later write replaces a name by rename, so the other
    name keeps its file; damage done *in place* to that one file would reach both names (docs: README,
    "Reliability"). Where the filesystem has no hard links, the two copies stay.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_written: tuple[Path, int] | None = None  # last.ckpt written by this process, at this step
        self._best_written: tuple[Path, int] | None = None  # the other checkpoint written last, at this step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        step = int(checkpoint.get("global_step", -1))
        best, best_step = self._best_written or (path, None)  # last.ckpt after the best of its step: a link
        if path.name == LAST and best_step == step and best.parent == path.parent and _link_over(best, path):
            self._last_written = (path, step)
            return
        with atomic_file(path, "wb") as handle:
            torch.save(checkpoint, handle)
        if path.name == LAST:
            self._last_written = (path, step)
        else:
            self._best_written = (path, step)
            if self._last_written == (path.parent / LAST, step):
                _link_over(path, path.parent / LAST)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path, map_location or "cpu")


def _link_over(source: Path, target: Path) -> bool:
    """Make `target` a hard link to `source`, atomically (link beside it, then rename over it)."""
    tmp = target.with_name(f".{target.name}.link-tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError as err:  # no hard links here (some network filesystems): keep both copies
        tmp.unlink(missing_ok=True)
        logger.debug("cannot link %s to %s (%s): keeping both copies", target.name, source.name, err)
        return False
    return True


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

    `last.ckpt` if it loads, else the newest readable checkpoint of the folder (with a warning: a kill may
    have lost or broken `last.ckpt` while the best checkpoint beside it is intact), else None.
    Lightning records absolute paths (best model, top-k, last) that it later compares, restores and *deletes*:
    every one is reduced to `<checkpoints>/<its file name>` (or dropped), whatever the checkpoint says.
    """
    last = checkpoints / LAST
    others = sorted(p for p in checkpoints.glob("*.ckpt") if p != last) if checkpoints.is_dir() else []
    if not last.exists() and not others:
        return None
    path, state = last, _readable(last) if last.exists() else None
    if state is None:
        steps = [(int(s.get("global_step", -1)), p) for p in others if (s := _readable(p))]
        if not steps:
            raise ConfigError(
                f"{last} is {'truncated or corrupted' if last.exists() else 'missing'} and no other checkpoint in "
                f"{checkpoints} is readable: start over with resume=false (this removes the broken checkpoints)"
            )
        step, path = max(steps)
        logger.warning(
            "%s is %s: resuming from %s (step %d) instead",
            last,
            "truncated or corrupted" if last.exists() else "missing",
            path.name,
            step,
        )
        state = load_checkpoint(path)
    _relocate(path, state, checkpoints)
    return path


def check_fits(checkpoint: Path, expected: dict[str, tuple[int, ...]], run: str) -> None:
    """Refuse, in one line, a checkpoint to resume from whose tensors are not the ones this run trains (a LoRA
    or 3-layer `last.ckpt` copied into the folder): names and shapes of `expected` (`model.<name>`). Read
    memory-mapped: only the headers, not the weights (the CRC was checked when the checkpoint was chosen)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("state_dict")
    if not isinstance(state, dict):
        raise ConfigError(f"{checkpoint} has no state_dict: resume=false starts {run} over (removing it)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or reshaped:
        parts = [
            f"{len(found)} {what} (e.g. {found[0]})"
            for what, found in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", reshaped),
            )
            if found
        ]
        raise ConfigError(
            f"{checkpoint} does not fit {run}: its tensors are not the ones this run trains ({'; '.join(parts)}), "
            "so it came from another strategy, model or neuron set. Resume the run it belongs to, or pass "
            "resume=false to start this one over (removing it)"
        )


def _own_path(value: Any, checkpoints: Path) -> str:
    """A recorded checkpoint path as `<checkpoints>/<its file name>`; "" for anything that is not a .ckpt name."""
    name = Path(str(value)).name if value else ""
    return str(checkpoints / name) if name.endswith(".ckpt") and name not in (".", "..") else ""


def _relocate(checkpoint: Path, state: dict[str, Any], checkpoints: Path) -> None:
    here = Path(os.path.realpath(checkpoints))  # what ModelCheckpoint compares its dirpath with
    changed = False
    for callback_state in (state.get("callbacks") or {}).values():
        if not isinstance(callback_state, dict) or "dirpath" not in callback_state:
            continue
        clean = {
            key: _own_path(value, here)
            for key, value in callback_state.items()
            if key.endswith("_path") and isinstance(value, str)
        }
        clean["dirpath"] = str(here)
        if isinstance(callback_state.get("best_k_models"), dict):
            clean["best_k_models"] = {
                own: score
                for k, score in callback_state["best_k_models"].items()
                if (own := _own_path(k, here))
            }
        if any(callback_state.get(key) != value for key, value in clean.items()):
            changed = True
            callback_state.update(clean)
    if changed:
        logger.info("checkpoint paths in %s now point into %s", checkpoint.name, here)
        with atomic_file(checkpoint, "wb") as handle:
            torch.save(state, handle)


def remove_untracked(checkpoints: Path, trainer: L.Trainer) -> list[Path]:
    """After training: remove the checkpoints of `checkpoints` that no ModelCheckpoint tracks any more (an old
    best that Lightning would not delete because the run resumed from it, or one a kill left behind).

    Only when every ModelCheckpoint writes into `checkpoints` and keeps nothing it does not track (save_top_k
    >= 0, and at most 1 without a monitor): otherwise the untracked files are the user's to keep."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    here = Path(os.path.realpath(checkpoints))
    keep = {LAST}
    for c in callbacks:
        if c.dirpath is None or Path(os.path.realpath(c.dirpath)) != here:
            return []
        if c.save_top_k < 0 or (c.monitor is None and c.save_top_k > 1):
            return []
        tracked = (c.best_model_path, c.kth_best_model_path, c.last_model_path, *c.best_k_models)
        keep |= {Path(p).name for p in tracked if p}
    if not callbacks or not here.is_dir():
        return []
    stale = [p for p in here.glob("*.ckpt") if p.name not in keep]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed checkpoints no longer tracked: %s", ", ".join(p.name for p in stale))
    return stale


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
