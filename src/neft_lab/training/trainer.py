"""The Lightning Trainer as a run uses it: built from the config with our callbacks, checkpoint IO and progress
bars, Lightning's log lines routed through Hydra's log, and what a finished fit leaves to read back (the best
checkpoint restored, the monitored metrics, the loggers closed)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from omegaconf import DictConfig

from neft_lab import signals
from neft_lab.errors import ConfigError
from neft_lab.training import checkpoints
from neft_lab.training.checkpoints import AtomicCheckpointIO
from neft_lab.training.guards import NonFiniteGuard
from neft_lab.training.module import CausalLMModule
from neft_lab.training.stops import ResumedLogStep, StepBoundaryStop

logger = logging.getLogger(__name__)


# Our training sampler resumes mid-epoch from the restored global step (data/datamodule.py), which
# Lightning cannot see; its warning about non-resumable loaders does not apply.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)
# Deprecations inside our dependencies, on every run, that a user can do nothing about: Lightning's pytree
# helper checks `isinstance(x, LeafSpec)` (torch), and PEFT/Lightning read `is_gradient_checkpointing`
# (transformers). Targeted by message, so any other warning still shows.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def route_lightning_logs_through_hydra() -> None:
    """Lightning installs its own console handler; drop it so each message prints once and reaches the run log."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdverts())


class ProgressBar(L.pytorch.callbacks.TQDMProgressBar):
    """Lightning's progress bar, on stderr with every other bar (tqdm's default) and the errors: Lightning's own
    writes its redraws to stdout, which then held ~65 KB of them in a smoke NeFT run; stdout keeps the results."""

    def _bar(self, desc: str, position: int, leave: bool, **extra: Any) -> Tqdm:
        return Tqdm(
            desc=desc,
            position=position,
            disable=self.is_disabled,
            leave=leave,
            dynamic_ncols=True,
            file=sys.stderr,
            bar_format=self.BAR_FORMAT,
            **extra,
        )

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(self.sanity_check_description, 2 * self.process_position, leave=False)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(self.train_description, 2 * self.process_position, leave=True, smoothing=0)

    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(self.predict_description, 2 * self.process_position, leave=True, smoothing=0)

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"  # no training bar under trainer.validate()
        return self._bar(
            self.validation_description, 2 * self.process_position + has_main_bar, leave=not has_main_bar
        )

    def init_test_tqdm(self) -> Tqdm:
        return self._bar("Testing", 2 * self.process_position, leave=True)


def bars_on_stderr(callbacks: list[Any]) -> list[Any]:
    """Lightning's own bar (named by a config, or the one it adds when none is) becomes `ProgressBar`."""
    for callback in callbacks:
        if type(callback) is L.pytorch.callbacks.TQDMProgressBar:
            callback.__class__ = ProgressBar  # its settings (refresh rate, position, leave), on stderr
    if not any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in callbacks):
        callbacks.append(ProgressBar())
    return callbacks


class StepProgressBar(ProgressBar):
    """One bar over the whole run, `<label> step k/K` (K = trainer.max_steps), for step-bounded runs whose
    epochs mean nothing (the NeFT reference run: max_epochs=-1 made Lightning's default bar read 'Epoch 0/-2')."""

    def __init__(self, label: str = "step", refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.label = label

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # once: the bar runs on across epochs
            bar.reset(total=trainer.max_steps)
            bar.n = trainer.global_step
        bar.set_description(self.label)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class _NoAdverts(logging.Filter):
    """Lightning's adverts (litlogger) and its accelerator inventory on every run: "TPU available: False, using: 0
    TPU cores" (HPU, IPU) and, where there is no GPU, "GPU available: False, used: False". A GPU's line stays:
    "GPU available: True (cuda), used: True" says which device the run trains on (used: False, that it is idle)."""

    NOISE = ("TPU available:", "HPU available:", "IPU available:", "GPU available: False")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and not message.startswith(self.NOISE)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks.append(StepBoundaryStop(run_dir / "checkpoints"))  # SIGTERM, SIGUSR1, Ctrl-C: training/stops.py
    callbacks.append(ResumedLogStep())
    callbacks.append(NonFiniteGuard())  # stops on NaN/inf before any checkpoint is written (guards.py)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # nor a progress bar callback with the bar off
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    else:  # every bar on stderr, stdout for the results
        callbacks = bars_on_stderr(callbacks)
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )


def restore_best(module: CausalLMModule, trainer: L.Trainer, run_dir: Path) -> str | None:
    """Load the best checkpoint's trainable tensors (best by validation loss) into the live model."""
    monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    best = checkpoints.best_checkpoint(
        run_dir / "checkpoints", monitored[0].best_model_path if monitored else None
    )
    if best is None:
        return None
    try:
        state = checkpoints.load_checkpoint(best)["state_dict"]
    except ConfigError as err:  # the trained weights are still in memory: keep them rather than lose the run
        logger.warning("%s; keeping the last weights", err)
        return None
    missing = set(state) - set(module.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint {best} holds tensors this model lacks: {sorted(missing)[:5]}")
    module.load_state_dict(state, strict=False)
    module.strategy.sync(module.model)
    return str(best)


PREEMPTED_EXIT = signals.STOPPED_EXIT  # 128 + SIGTERM, what a scheduler expects from a job it stopped


def preempted(trainer: L.Trainer, cfg: DictConfig, run_dir: Path) -> None:
    """Stopped at a step boundary by a signal (training/stops.py): exit 143 (130 for Ctrl-C) with the resume hint."""
    stop = next(c for c in trainer.callbacks if isinstance(c, StepBoundaryStop))
    err = stop.stopped(trainer)
    signals.report(err, where=f"at step {trainer.global_step} of {cfg.trainer.max_steps}")
    raise err


def metric(trainer: L.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def best_score(trainer: L.Trainer) -> float | None:
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None) if callback is not None else None
    return None if score is None else float(score)


def finish_loggers(trainer: L.Trainer) -> None:
    """Close W&B runs so every job of a multirun gets its own."""
    for lg in trainer.loggers:
        lg.finalize("success")
        experiment = getattr(lg, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()
