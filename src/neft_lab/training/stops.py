"""Stop training at a step boundary on SIGTERM, SIGUSR1 (outside SLURM) and Ctrl-C, and resume to the same state.

Lightning's own SIGTERM handling stops at the end of a training step, but also in the middle of a validation
(its evaluation loop checks the flag after every batch), and Ctrl-C raises `KeyboardInterrupt` wherever the
process is, mid-step: a checkpoint saved there resumes to other weights (an optimizer step half done, the
learning-rate schedule one step off) and another training log (steps off by one).

`StepBoundaryStop` takes these signals over once training runs (`on_train_start`, after Lightning installed
its handlers; Lightning's teardown puts back the ones from before `fit`). A signal only records the request
(forwarded to the ranks Lightning started itself); the step in progress ends, with its validation when one
is due, and only then is Lightning's flag raised, so Lightning stops where a finished step leaves its loops
(`SIGTERMException` at the end of the step). `on_exception` saves `<checkpoints>/last.ckpt` there and the
pipeline exits 143 (130 for Ctrl-C) with the resume command. The last step of an epoch is different: there
Lightning stops only after marking the epoch complete, a state that resumes into the next epoch with the
batches of the one after; so the checkpoint is saved at that step (after its validation, if one is due) and
training stops when the epoch ends. A second Ctrl-C stops at once (no checkpoint
of that half step: the last one on schedule stays). Under DDP every rank takes the decision together (one
boolean all-reduce per step), so no rank waits in a collective for one that has stopped.

`LastCheckpoint` (`callbacks.last_checkpoint`) writes `last.ckpt` of a step with a validation after that
validation (Lightning's `ModelCheckpoint(every_n_train_steps=...)` writes it before): a run killed during the
validation resumes from the checkpoint before, and runs, logs and ranks that validation again; from the
state before it Lightning would skip it.

`ResumedLogStep` keeps the step Lightning logs under (`_batches_that_stepped`) equal to the optimizer steps
done when a run resumes: Lightning adds one for some checkpoints and not for others, shifting the resumed
part of `metrics.csv` by one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from neft_lab.signals import Stopped, signal_name, stopping_signals

logger = logging.getLogger(__name__)
LAST = "last.ckpt"


class StepBoundaryStop(L.Callback):
    """On a stopping signal during training: finish the step (and its validation), save last.ckpt, stop."""

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = Path(checkpoints)
        self.requested: int | None = None  # the signal that asked to stop
        self.saved: Path | None = None
        self._held = False  # Lightning's flag, held back while a validation runs
        self._at_epoch_end = False  # stop when the epoch ends (saved at its last step)
        self._saved_step: int | None = None
        self._requested_at = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in stopping_signals():
            signal.signal(signum, lambda s, f: self._request(trainer, s))

    def _request(self, trainer: L.Trainer, signum: int) -> None:
        if self.requested is not None:
            # Ctrl-C twice: now (a second copy within a second is the terminal's and the launcher's of one Ctrl-C)
            if signum == signal.SIGINT and time.monotonic() - self._requested_at > 1.0:
                raise Stopped(signum)
            return
        self.requested, self._requested_at = signum, time.monotonic()
        launcher = trainer.strategy.launcher  # ranks Lightning started itself get the signal too
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)
        if signum == signal.SIGINT and trainer.is_global_zero:
            os.write(2, b"\nstopping at the end of this training step (Ctrl-C again: stop now)\n")

    def _stop_agreed(self, trainer: L.Trainer) -> bool:
        stop = self.requested is not None
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
            if stop and self.requested is None:
                self.requested = signal.SIGTERM  # another rank's
        return stop

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._stop_agreed(trainer):
            return
        if not _ends_epoch(trainer):
            trainer._signal_connector.received_sigterm = True  # Lightning stops at the end of this step
        elif not _validates_after(trainer):
            self._save(trainer)  # the state a checkpoint of this step has; stop when the epoch ends
            self._at_epoch_end = True
        else:
            self._at_epoch_end = True  # saved after the validation

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.received_sigterm:  # let the validation finish first
            trainer._signal_connector.received_sigterm = False
            self._held = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._stop_agreed(trainer) or self._held or self._at_epoch_end:
            if _ends_epoch(trainer):
                self._save(trainer)
                self._at_epoch_end = True
            else:
                trainer._signal_connector.received_sigterm = True
        self._held = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A stop at the last step of an epoch: saved at that step (Lightning's own stop comes after the epoch
        is marked complete, a state that resumes into the next epoch's batches in another order)."""
        if self._at_epoch_end:
            raise SIGTERMException

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.checkpoint_callback is None or trainer.global_step == 0:
            return
        self.saved = self.checkpoints / LAST
        trainer.save_checkpoint(self.saved)
        self._saved_step = trainer.global_step
        logger.warning("stopped at step %d: saved %s", trainer.global_step, self.saved)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or self.requested is None:
            return  # a crash, or a stop mid-step: the last checkpoint on schedule stays
        if self._saved_step != trainer.global_step:
            self._save(trainer)

    def stopped(self, trainer: L.Trainer) -> Stopped:
        """The exception that ends the run, once Lightning stopped for this callback's signal."""
        signum = self.requested or signal.SIGTERM
        where = (
            f"checkpoint {self.saved}"
            if self.saved
            else "no checkpoint (nothing trained yet, or checkpoints are off)"
        )
        err = Stopped(signum, saved=where)
        logger.info("%s at step %d", signal_name(signum), trainer.global_step)
        return err


class LastCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint(save_last=True, every_n_train_steps=N)` whose `last.ckpt` of a step with a validation is
    written after that validation (Lightning writes it before: a kill during the validation then resumes past
    it, and its result is never logged nor ranked)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._after_validation: int | None = None  # the step whose last.ckpt waits for its validation

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if _validates_after(trainer):
            self._after_validation = trainer.global_step
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        step, self._after_validation = self._after_validation, None
        every = self._every_n_train_steps
        if (
            step == trainer.global_step
            and not trainer.sanity_checking
            and every >= 1
            and step % every == 0
            and self._last_global_step_saved != step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _ends_epoch(trainer: L.Trainer) -> bool:
    """Whether the training step that just ended was the last of its epoch."""
    try:
        return bool(trainer.fit_loop.epoch_loop._num_ready_batches_reached())
    except Exception:  # noqa: BLE001 - another Lightning
        return False


def _validates_after(trainer: L.Trainer) -> bool:
    """Whether a validation runs at the end of the training step that just ended."""
    loop = trainer.fit_loop
    try:
        return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
    except Exception:  # noqa: BLE001 - another Lightning: save as it does
        return False


class ResumedLogStep(L.Callback):
    """After a resume, log under the number of optimizer steps done (as the uninterrupted run does)."""

    def __init__(self) -> None:
        self._checked = False

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._checked:
            return
        self._checked = True
        loop = trainer.fit_loop.epoch_loop
        if trainer.ckpt_path and hasattr(loop, "_batches_that_stepped") and pl_automatic(trainer):
            loop._batches_that_stepped = trainer.global_step


def pl_automatic(trainer: L.Trainer) -> bool:
    module = trainer.lightning_module
    return module is None or module.automatic_optimization
