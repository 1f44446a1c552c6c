"""Stop a diverged run before it writes anything from the diverged state.

`NonFiniteGuard` checks the training loss after every batch, the validation loss after every
validation, and the trained weights before every checkpoint and when training ends. A NaN or
infinite value raises `NonFiniteLossError` (a `ConfigError`: the CLI prints it in one line and
exits 2), so

- no checkpoint of a non-finite state is written: Lightning runs every other callback before its
  `ModelCheckpoint` callbacks (`_CallbackConnector._reorder_callbacks` moves them to the end of the
  list), so the guard's `on_train_batch_end`, `on_validation_end` and `on_train_end` raise before a
  `ModelCheckpoint` saves or records a best score, and its `on_save_checkpoint` (called while the
  checkpoint is assembled, before it is written) refuses non-finite weights; `last.ckpt` and the best
  checkpoint from before stay as they were;
- a NaN validation loss is never chosen as the best checkpoint (Lightning would choose it while
  fewer than `save_top_k` checkpoints exist);
- nothing is exported and `metrics.json` is not written.

On several processes every rank takes the same decision (a boolean all-reduce per batch), so no rank
is left waiting in a collective while another has stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from neft_lab.errors import NonFiniteLossError

VAL_KEY = "val/loss"


class NonFiniteGuard(L.Callback):
    """Raise `NonFiniteLossError` on a non-finite training loss, validation loss or trained weight."""

    def __init__(self, val_key: str = VAL_KEY) -> None:
        self.val_key = val_key

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = _as_float(outputs.get("loss") if isinstance(outputs, dict) else outputs)
        finite = value is None or math.isfinite(value)
        if _all_ranks_agree(trainer, finite):
            return
        what = (
            "the training loss is not finite on another rank" if finite else f"the training loss is {value}"
        )
        raise NonFiniteLossError(_message(trainer, pl_module, what))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:  # nothing is saved after the sanity check; training will tell
            return
        value = _as_float(trainer.callback_metrics.get(self.val_key))
        if value is None or math.isfinite(value):  # logged with sync_dist: the same on every rank
            return
        raise NonFiniteLossError(
            _message(trainer, pl_module, f"the validation loss {self.val_key} is {value}")
        )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint saved every N steps is written in `on_train_batch_end`, after the step's update
        and before any loss of the updated weights is known: that update may have broken them."""
        _check_weights(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The last update comes after the last checked loss: check the weights before
        `ModelCheckpoint.on_train_end` writes `last.ckpt` and before the pipeline exports them."""
        _check_weights(trainer, pl_module)


def _check_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    bad = _first_non_finite_parameter(pl_module)
    if _all_ranks_agree(trainer, bad is None):
        return
    where = bad or "a trained tensor on another rank"
    raise NonFiniteLossError(_message(trainer, pl_module, f"{where} holds NaN or infinite values"))


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _all_ranks_agree(trainer: L.Trainer, finite: bool) -> bool:
    """Whether the value is finite on every rank (one rank stopping alone would hang the others)."""
    if trainer.world_size <= 1:
        return finite
    return bool(trainer.strategy.reduce_boolean_decision(finite, all=True))


def _first_non_finite_parameter(module: torch.nn.Module) -> str | None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2: this rank's shard
            if local.numel() and not bool(torch.isfinite(local).all()):
                return name
    return None


def _message(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> str:
    """One line: what, where, what was kept, and the fix."""
    value = getattr(pl_module, "lr", None)
    lr = f"{value:g}" if isinstance(value, (int, float)) else "?"
    return (
        f"training diverged at step {trainer.global_step}: {what}. Stopped without saving this state "
        f"({_kept_checkpoints(trainer)}). Lower optim.lr (now {lr}), check the "
        f"training data for broken examples, or clip gradients with trainer.gradient_clip_val "
        f"(now {trainer.gradient_clip_val}); then start again with resume=false or in a new run folder"
    )


def _kept_checkpoints(trainer: L.Trainer) -> str:
    paths = []
    for callback in trainer.checkpoint_callbacks:
        paths += [getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")]
    kept = [p for p in dict.fromkeys(paths) if p and Path(p).exists()]
    return "kept: " + ", ".join(kept) if kept else "no checkpoint was written before"
