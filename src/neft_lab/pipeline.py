"""The stages a run goes through: `fit` (train, export, evaluate), `eval` (score a saved result) and `export`
(a saved result, e.g. a NeFT delta on its base model, as a merged Hugging Face folder)."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from neft_lab import chain, run_folder, signals, tracking
from neft_lab.data.datamodule import TaskDataModule
from neft_lab.data.encoding import PromptEncoder
from neft_lab.data.task import Task
from neft_lab.errors import ConfigError
from neft_lab.evaluation.evaluate import autocast_dtype, evaluate, format_metrics
from neft_lab.integrity import check_finite_weights
from neft_lab.io import atomic_dir, atomic_write_json, atomic_write_jsonl
from neft_lab.models.loading import load_model, load_pretrained, load_tokenizer, parameter_count, torch_dtype
from neft_lab.neurons import delta_file, reference_weights, sliced
from neft_lab.ranks import launched_as_rank_zero
from neft_lab.results import main_metric
from neft_lab.strategies import StrategyContext, TrainingStrategy, build_strategy
from neft_lab.threads import apply_threads
from neft_lab.training import checkpoints
from neft_lab.training.checkpoints import AtomicCheckpointIO
from neft_lab.training.distributed import uses_fsdp2
from neft_lab.training.guards import NonFiniteGuard
from neft_lab.training.module import CausalLMModule
from neft_lab.training.stops import ResumedLogStep, StepBoundaryStop
from neft_lab.validation import validate

logger = logging.getLogger(__name__)


_DEPTH = [0]  # > 0 while a run is going on in this process: the NeFT reference run is nested in its run


def nested_run() -> bool:
    """True inside a run started by another run (the NeFT reference run)."""
    return _DEPTH[0] > 1


def run(cfg: DictConfig) -> float | None:
    """Run the configured stage; returns the main test metric, or what `sweep_objective` names (for Hydra sweepers).

    The folder Hydra made for the command (`hydra.run.dir`) is left only when it holds a result:
    `stage=report`/`export` remove it, `resume=<folder>` removes it and logs into <folder>, and a command
    that fails before writing anything but `.hydra/`, its log and `config.yaml` moves it to
    `<paths.output_dir>/failed/...` and names that log in the error (run_folder.set_aside_failed).
    """
    # the launching process only: DDP ranks it starts rerun the command in the same folder
    folder = run_folder.hydra_output_dir() if _DEPTH[0] == 0 and launched_as_rank_zero() else None
    output_dir = Path(str(OmegaConf.select(cfg, "paths.output_dir", default=None) or "outputs"))
    state: dict[str, Any] = {"folder": folder, "cfg": cfg}
    _DEPTH[0] += 1
    try:
        result = _run(cfg, state, output_dir)
        from neft_lab.lr_search import objective  # what a sweeper gets: sweep_objective=test|val_loss

        result = objective(cfg, result)
    except BaseException as err:
        stopped = isinstance(err, signals.Stopped)
        if stopped:  # one line with the resume hint, while the run folder is known
            signals.report(err)
        if state["folder"] is not None:  # a stopped run's folder stays where the hint says
            keep = state.get("keep", False) or (stopped and signals.current_run_dir() is not None)
            run_folder.after_failure(err, cfg, state["folder"], output_dir, keep=keep)
        raise
    finally:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            signals.set_run_dir(None)
        if state.get("lock") is not None:
            state["lock"].release()
    if state["folder"] is not None and OmegaConf.select(cfg, "stage") in run_folder.NO_FOLDER_STAGES:
        run_folder.discard(state["folder"], output_dir)
    return result


def _run(cfg: DictConfig, state: dict[str, Any], output_dir: Path) -> float | None:
    validate(cfg)  # the whole config (stage, paths, values), before any model or data is loaded
    if cfg.stage == "report":  # reads finished runs back: no model, no seeding, no run folder of its own
        from neft_lab.report import report

        return report(cfg)
    _route_lightning_logs_through_hydra()
    if cfg.stage == "export":  # writes beside the saved run (or to export.out): no run folder of its own
        export_saved(cfg)
        return None
    if cfg.stage in ("reference", "score", "select"):  # the NeFT selection chain, run apart (neft_lab.chain)
        apply_threads(cfg, on_gpu=_on_gpu(cfg))
        chain.run_stage(cfg)
        return None
    if cfg.stage == "analyze":  # writes to its analysis folder (analysis.out): no run folder of its own
        from neft_lab.analysis.stage import analyze

        apply_threads(cfg, on_gpu=_on_gpu(cfg))
        analyze(cfg)
        return None
    cfg = _config_of_resumed_run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    resumed = str(cfg.get("resume", "auto")).lower() not in ("auto", "false", "none", "never")
    if state["folder"] is not None and resumed and state["folder"].resolve() != run_dir.resolve():
        run_folder.continue_log_in(state["folder"], run_dir, output_dir)  # work goes on in <run_dir>
        state.update(folder=run_dir, keep=True)  # the resumed run's folder: never set aside
    keep, state["keep"] = state.get("keep", False), True  # a folder another job works in is never set aside
    state["lock"] = run_folder.RunFolderLock(run_dir).acquire() if launched_as_rank_zero() else None
    state["keep"] = keep
    finished = run_folder.prepare(cfg, run_dir)
    if finished is not None:
        return main_metric(finished.get("after"))
    if cfg.stage == "fit" and not nested_run():
        signals.set_run_dir(run_dir)  # a stop from here on says how to resume this folder
    if cfg.stage == "fit" and state["lock"] is not None:  # rank 0, holding the lock
        run_folder.remove_leftovers(run_dir)  # what a killed job's writes left
    hydra_folder = state["folder"]
    fresh = str(cfg.get("resume", "auto")).lower() in ("false", "none", "never")
    if hydra_folder is not None and not resumed and (fresh or not (hydra_folder / ".hydra").exists()):
        run_folder.save_hydra_files(hydra_folder, state["cfg"])  # only now: a refused or no-op rerun keeps it
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    apply_threads(cfg, on_gpu=_on_gpu(cfg))
    return fit(cfg, run_dir) if cfg.stage == "fit" else evaluate_saved(cfg, run_dir)


def _on_gpu(cfg: DictConfig) -> bool:
    """Whether the run computes on a GPU (then torch's CPU threads only feed it: no advice about them)."""
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto")).lower()
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def _config_of_resumed_run(cfg: DictConfig) -> DictConfig:
    """`resume=<run folder>`: continue that run, in that folder, with the config it was started with."""
    mode = str(cfg.get("resume", "auto"))
    if mode.lower() in ("auto", "false", "none", "never"):
        return cfg
    folder = Path(mode).expanduser()
    if not (folder / "config.yaml").exists():
        raise ConfigError(f"resume={mode}: not a run folder (no config.yaml there)")
    saved = OmegaConf.load(folder / "config.yaml")
    run_folder.check_saved_config(saved, cfg, folder / "config.yaml")  # it names no class to run
    saved = run_folder.moved_to(saved, folder)  # a copied or moved folder: checkpoints and logs go into it
    saved.resume = str(folder)
    return saved


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


def _route_lightning_logs_through_hydra() -> None:
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


def _bars_on_stderr(callbacks: list[Any]) -> list[Any]:
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


def _summary_line(cfg: DictConfig, summary: dict[str, Any]) -> str:
    return (
        f"model={cfg.model.name} task={cfg.task.name} strategy={summary['strategy']} "
        f"trainable={summary['trainable_parameters']:,}/{summary['total_parameters']:,} "
        f"({summary['trainable_percent']:.3f}%) "
        + (
            f"steps={cfg.trainer.max_steps} "
            if cfg.trainer.max_steps != -1
            else f"epochs={cfg.trainer.get('max_epochs')} "
        )
        + f"lr={cfg.optim.lr} "
        f"batch={cfg.loader.batch_size} seed={cfg.seed}"
    )


def _evaluate_split(
    cfg: DictConfig, model: torch.nn.Module, encoder: PromptEncoder, datamodule: TaskDataModule, label: str
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    metrics, rows = evaluate(
        model,
        encoder,
        datamodule.examples("test"),
        batch_size=cfg.eval.batch_size,
        comet_model=cfg.eval.comet_model,
        desc=f"test ({label})",
        loss=bool(cfg.eval.get("loss", True)),
        autocast=autocast_dtype(cfg.eval.get("precision", "auto"), cfg.trainer.get("precision")),
    )
    logger.info("%s: %s", label, format_metrics(metrics))
    for row in rows[: cfg.eval.show]:
        logger.info(
            "  src: %s\n  ref: %s\n  hyp: %s",
            row["source"][:200],
            row["reference"][:200] or ", ".join(row.get("instruction_id_list", ())),  # IFEval: the checks
            row["prediction"][:200],
        )
    return metrics, rows


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
        callbacks = _bars_on_stderr(callbacks)
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )


def _restore_best(module: CausalLMModule, trainer: L.Trainer, run_dir: Path) -> str | None:
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


def _evaluation_device(cfg: DictConfig) -> torch.device:
    """The device this process will train on (Lightning's choice for accelerator=auto/gpu), known before the
    Trainer exists; the CPU under FSDP, whose sharding the Trainer sets up."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and not uses_fsdp2(cfg.trainer):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """Continue from <run>/checkpoints/last.ckpt when the run folder has one (resume=auto or a run folder)."""
    mode = str(cfg.get("resume", "auto")).lower()
    if mode in ("false", "none", "never"):
        return None
    last = checkpoints.resumable_checkpoint(run_dir / "checkpoints")  # checked, paths re-pointed here
    if last is not None:
        logger.info("resuming from %s", last)
        return str(last)
    if mode != "auto":
        raise ConfigError(f"resume={cfg.resume}: no checkpoint in {run_dir / 'checkpoints'} to resume from")
    return None


def fit(cfg: DictConfig, run_dir: Path) -> float | None:
    started = time.perf_counter()
    strategy = build_strategy(cfg.strategy)
    resume_from = _resume_checkpoint(cfg, run_dir)
    ctx = StrategyContext(cfg=cfg, run_dir=run_dir, cache_dir=Path(cfg.paths.cache_dir))
    if resume_from and (run_dir / "neuron_set.safetensors").exists():  # resume with the very same neurons
        ctx.extras["neuron_set_file"] = run_dir / "neuron_set.safetensors"
    if getattr(strategy, "uses_selection", False) and "neuron_set_file" not in ctx.extras:
        scores = chain.scores_for_fit(cfg)  # reference and score stages (cached), before the model is loaded
        if scores is not None:
            ctx.extras["scores_file"] = scores
    strategy.prepare(ctx)
    model, tokenizer = load_model(cfg.model)
    base_parameters = parameter_count(model)
    task = Task.from_config(cfg.task)
    encoder = PromptEncoder(tokenizer, task, chat_template=cfg.model.chat_template)
    datamodule = TaskDataModule(
        task,
        encoder,
        batch_size=cfg.loader.batch_size,
        eval_batch_size=cfg.loader.eval_batch_size,
        num_workers=cfg.loader.num_workers,
        seed=cfg.seed,
    )
    datamodule.setup()
    ctx.datamodule = datamodule
    model = strategy.apply(model, ctx)
    summary = strategy.summary(model, base_parameters)
    where = "reference run dir" if nested_run() else "run dir"  # the NeFT reference run is nested in its run
    logger.info("%s\n%s: %s", _summary_line(cfg, summary), where, run_dir)

    results: dict[str, Any] = {"model": cfg.model.name, "task": task.name, "seed": cfg.seed, **summary}
    if (
        cfg.eval.before and launched_as_rank_zero()
    ):  # other ranks of a distributed launch would only repeat it
        model.to(_evaluation_device(cfg))  # generate on the accelerator the run trains on, not on the CPU
        results["before"], _ = _evaluate_split(cfg, model, encoder, datamodule, "before fine-tuning")

    module = CausalLMModule(model, strategy, **OmegaConf.to_container(cfg.optim, resolve=True))
    if resume_from and not uses_fsdp2(cfg.trainer):  # FSDP2 saves sharded state of its own layout
        trainable = strategy.trainable_state_dict(model)
        expected = {f"model.{k}": tuple(v.shape) for k, v in trainable.items()}
        checkpoints.check_fits(
            Path(resume_from), expected, f"strategy={cfg.strategy.name} on model={cfg.model.name}"
        )
    trainer = build_trainer(cfg, run_dir)
    if trainer.checkpoint_callback is not None:
        checkpoints.check_writable(run_dir / "checkpoints")
    stats = tracking.attach_run_stats(trainer)
    tracking.log_run_start(trainer, cfg, summary, getattr(strategy, "neuron_set", None))
    train_started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except SIGTERMException:  # Lightning stops at a step boundary and would exit 0
        _preempted(trainer, cfg, run_dir)
    best = _restore_best(module, trainer, run_dir)
    if launched_as_rank_zero():
        checkpoints.remove_untracked(run_dir / "checkpoints", trainer)  # e.g. an old best resumed from
    results["train"] = {
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - train_started, 2),
        "final_loss": _metric(trainer, "train/loss") or stats.final_loss,  # also with nothing left to train
        "best_val_loss": _best_score(trainer),
        "best_checkpoint": best,
        **stats.summary(),  # median step seconds and tokens/s, peak memory
    }
    tracking.log_run_end(trainer, results["train"])
    if cfg.export.enabled:
        strategy.export(model, tokenizer, run_dir / "export")
        written = [
            run_dir / name for name in ("export", "neft_delta.safetensors") if (run_dir / name).exists()
        ]
        results["export"] = [str(p) for p in written]

    if not uses_fsdp2(
        cfg.trainer
    ):  # Lightning hands the model back on the CPU after fit: evaluate on the device
        model.to(trainer.strategy.root_device)
    if cfg.eval.after:
        results["after"], rows = _evaluate_split(cfg, model, encoder, datamodule, "after fine-tuning")
        atomic_write_jsonl(run_dir / "predictions.jsonl", rows)
        for lg in trainer.loggers:
            lg.log_metrics(
                {f"test/{k}": v for k, v in results["after"].items() if isinstance(v, (int, float))},
                step=trainer.global_step,
            )
        tracking.log_predictions(trainer, rows, int(cfg.eval.get("log_predictions", 20)))
    results["wall_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(run_dir / "metrics.json", results)
    _finish_loggers(trainer)
    _print_outcome(results, run_dir)
    return main_metric(results.get("after"))


PREEMPTED_EXIT = signals.STOPPED_EXIT  # 128 + SIGTERM, what a scheduler expects from a job it stopped


def _preempted(trainer: L.Trainer, cfg: DictConfig, run_dir: Path) -> None:
    """Stopped at a step boundary by a signal (training/stops.py): exit 143 (130 for Ctrl-C) with the resume hint."""
    stop = next(c for c in trainer.callbacks if isinstance(c, StepBoundaryStop))
    err = stop.stopped(trainer)
    signals.report(err, where=f"at step {trainer.global_step} of {cfg.trainer.max_steps}")
    raise err


def _metric(trainer: L.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _best_score(trainer: L.Trainer) -> float | None:
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None) if callback is not None else None
    return None if score is None else float(score)


def _finish_loggers(trainer: L.Trainer) -> None:
    """Close W&B runs so every job of a multirun gets its own."""
    for lg in trainer.loggers:
        lg.finalize("success")
        experiment = getattr(lg, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


def _print_outcome(results: dict[str, Any], run_dir: Path) -> None:
    lines = [f"results in {run_dir}/metrics.json"]
    for label in ("before", "after"):
        if label in results:
            lines.append(f"{label:>6}: {format_metrics(results[label])}")
    losses = [results.get(label, {}).get("loss") for label in ("before", "after")]
    if None not in losses:  # learning shows here first: a small model's greedy output may still score 0 BLEU
        change = 100 * (losses[1] - losses[0]) / losses[0]
        lines.append(f"test loss {losses[0]:.2f} → {losses[1]:.2f} ({change:+.0f}%)")
    lines.append(f"wall time {results['wall_seconds']:.0f} s")
    logger.info("\n".join(lines))


DELTA_FILE = delta_file.FILE


def _delta_file(path: Path) -> Path | None:
    """`path` as a NeFT delta: the file itself, or a run folder (or a `NeuronModel.save_pretrained` folder) that
    holds one (and no merged export/)."""
    if path.is_file() and path.suffix == ".safetensors":
        delta_file.read_header(path)  # refused in one line unless it is a NeFT delta
        return path
    if path.is_dir() and not (path / "export").is_dir() and (path / DELTA_FILE).is_file():
        return path / DELTA_FILE
    return None


def _base_plus_delta(cfg: DictConfig, delta_path: Path) -> tuple[torch.nn.Module, Any]:
    """The base model of `cfg.model` with the delta written in, after checking it is the base the delta was
    trained from (the hash of the weights it touches, `sliced.base_hash`). The reader is `neurons.delta_file`,
    the one `NeuronModel.from_pretrained` uses."""
    fix = "re-export it from its run (stage=export ckpt=<run>/checkpoints/last.ckpt) or copy an intact one"
    delta, meta = delta_file.read(delta_path, fix)
    model, tokenizer = load_model(cfg.model)
    try:
        sliced.check_delta(model, delta)  # keys, module names, axes, indices, shapes: before hashing the base
    except ValueError as err:
        raise ConfigError(f"{delta_path} does not fit model={cfg.model.name}: {err}; {fix}") from None
    label = f"model={cfg.model.name} (dtype {cfg.model.dtype})"
    if not delta_file.check_base(model, delta, meta, delta_path, label):
        logger.warning("%s records no base model hash (an older delta): applied without checking the base",
                       delta_path)  # fmt: skip
    try:
        sliced.apply_delta(model, delta)
    except ValueError as err:
        raise ConfigError(f"{delta_path} does not fit model={cfg.model.name}: {err}") from None
    return model, tokenizer


def _load_for_eval(cfg: DictConfig, path: Path) -> tuple[torch.nn.Module, Any]:
    """A saved result as a model: full export folder, PEFT adapter folder, run folder, NeFT delta
    (`neft_delta.safetensors`, on its checked base model) or Lightning .ckpt."""
    delta = _delta_file(path)
    if delta is not None:
        return _base_plus_delta(cfg, delta)
    if path.is_dir() and (path / "export").is_dir():
        path = path / "export"
    if path.is_dir() and reference_weights.is_compact(path) and not (path / "config.json").exists():
        raise ConfigError(reference_weights.not_a_model(path.parent if path.name == "export" else path))
    if path.is_dir() and (path / "adapter_config.json").exists():
        from peft import PeftModel

        base, tokenizer = load_model(cfg.model)
        try:
            return PeftModel.from_pretrained(base, str(path)), tokenizer
        except Exception as err:  # noqa: BLE001 - truncated (SafetensorError) or another model's (RuntimeError)
            if isinstance(err, torch.OutOfMemoryError):
                raise
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            raise ConfigError(
                f"the LoRA adapter {path} does not fit model={cfg.model.name} or is truncated/damaged "
                f"({type(err).__name__}: {reason}): pass the model it was trained on, or re-create the adapter"
            ) from None
    if path.is_dir() and (path / "config.json").exists():
        return load_pretrained(path, torch_dtype(cfg.model.dtype), cfg.model), load_tokenizer(path, cfg.model)
    if path.is_file() and path.suffix == ".ckpt":
        model, tokenizer = load_model(cfg.model)
        strategy: TrainingStrategy = build_strategy(cfg.strategy)
        neuron_set = (
            path.parent.parent / "neuron_set.safetensors"
        )  # <run>/checkpoints/x.ckpt → <run>/neuron_set
        extras = {"neuron_set_file": neuron_set} if neuron_set.exists() else {}
        model = strategy.apply(model, StrategyContext(cfg=cfg, extras=extras))
        state = checkpoints.load_checkpoint(path).get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(
                f"{path} has no state_dict of tensors: it is not a Lightning checkpoint of a run; give a run "
                "folder's checkpoints/last.ckpt (or best.ckpt), its export/ folder or its neft_delta.safetensors"
            )
        prefix = "model."
        try:
            missing = model.load_state_dict({k[len(prefix) :]: v for k, v in state.items()}, strict=False)
        except RuntimeError as err:  # size mismatches: another model, layer count or neuron set
            reason = " ".join(str(err).split())[:300]
            raise ConfigError(
                f"{path} does not fit strategy={cfg.strategy.name} on model={cfg.model.name} ({reason}). Pass the "
                "strategy/model it was trained with, or evaluate it from its own run folder"
            ) from None
        if missing.unexpected_keys:
            raise ConfigError(
                f"{path} does not fit strategy={cfg.strategy.name} on model={cfg.model.name}: "
                f"unexpected tensors {missing.unexpected_keys[:3]}. Pass the strategy/model it was trained with."
            )
        strategy.sync(model)
        return model, tokenizer
    raise ConfigError(
        f"ckpt={path} is not a run folder, an export folder (config.json or adapter_config.json) "
        "or a Lightning .ckpt file"
    )


def export_saved(cfg: DictConfig) -> Path:
    """`stage=export ckpt=<run>`: the saved result as a merged Hugging Face folder (default `<run>/export`)."""
    path = Path(cfg.ckpt).expanduser()  # validate() checked that it is given and exists
    run_root = path.parent.parent if path.suffix == ".ckpt" else path.parent if path.is_file() else path
    out_setting = (cfg.get("export") or {}).get("out")
    out = Path(out_setting).expanduser() if out_setting else run_root / "export"
    if _delta_file(path) is None:
        folder = path / "export" if (path / "export").is_dir() else path
        if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
            if out_setting and out.resolve() != folder.resolve():  # export.out=<folder>: a copy there
                import shutil

                with atomic_dir(out) as tmp_dir:
                    shutil.copytree(folder, tmp_dir, dirs_exist_ok=True)
                logger.info("%s is already a Hugging Face folder: copied to %s", folder, out)
                return out
            logger.info("%s is already a Hugging Face folder: nothing to export", folder)
            return folder
    cfg = cfg.copy()
    OmegaConf.update(cfg, "paths.run_dir", str(run_root))  # this stage has no run folder of its own
    cfg = _with_run_config(cfg, path)
    model, tokenizer = _load_for_eval(cfg, path)
    check_finite_weights(model, path)  # NaN/inf weights: refused, not exported or scored as loss null, BLEU 0
    if hasattr(model, "merge_and_unload"):  # a PEFT model from a LoRA .ckpt
        model = model.merge_and_unload()
    sliced.merge(model)  # NeFT from a .ckpt: plain layers again (a no-op otherwise)
    with atomic_dir(out) as tmp_dir:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
    logger.info("exported %s to %s", path, out)
    return out


def evaluate_saved(cfg: DictConfig, run_dir: Path) -> float | None:
    path = Path(cfg.ckpt).expanduser()  # validate() checked that it is given and exists
    cfg = _with_run_config(cfg, path)
    model, tokenizer = _load_for_eval(cfg, path)
    check_finite_weights(model, path)  # NaN/inf weights: refused, not exported or scored as loss null, BLEU 0
    task = Task.from_config(cfg.task)
    encoder = PromptEncoder(tokenizer, task, chat_template=cfg.model.chat_template)
    datamodule = TaskDataModule(task, encoder, eval_batch_size=cfg.loader.eval_batch_size, seed=cfg.seed)
    metrics, rows = _evaluate_split(cfg, model, encoder, datamodule, f"{path.name}")
    atomic_write_jsonl(run_dir / "predictions.jsonl", rows)
    atomic_write_json(
        run_dir / "metrics.json",
        {"model": cfg.model.name, "task": task.name, "ckpt": str(path), "after": metrics},
    )
    _print_outcome({"after": metrics, "wall_seconds": metrics["seconds"]}, run_dir)
    return main_metric(metrics)


def _with_run_config(cfg: DictConfig, path: Path) -> DictConfig:
    """For a run folder, reuse the model and strategy it was trained with (and its task unless task= is given)."""
    run_cfg_file = next(
        (p / "config.yaml" for p in (path, path.parent, path.parent.parent) if (p / "config.yaml").exists()),
        None,
    )
    if run_cfg_file is None:
        return cfg
    saved = _saved_run_config(run_cfg_file)
    run_folder.check_saved_config(saved, cfg, run_cfg_file, keys=("model", "strategy", "task"))
    merged = OmegaConf.to_container(cfg, resolve=True)
    merged["model"] = OmegaConf.to_container(saved.model)
    merged["strategy"] = OmegaConf.to_container(saved.strategy)
    if not _overridden("task"):
        merged["task"] = OmegaConf.to_container(saved.task)
    return OmegaConf.create(merged)


def _saved_run_config(file: Path) -> Any:
    """A run folder's config.yaml, with the model, strategy and task sections stage=eval/export reuse; a garbled
    file or one without them is one line, not a YAML or OmegaConf traceback."""
    fix = "re-create it (copy the run folder again), or give ckpt= an export folder or a delta on its own"
    try:
        saved = OmegaConf.load(file)
    except Exception as err:  # noqa: BLE001 - YAML syntax, binary garbage, unreadable
        reason = " ".join(str(err).split())[:160]
        raise ConfigError(
            f"{file} is not a readable run config ({type(err).__name__}: {reason}): {fix}"
        ) from None
    if isinstance(saved, DictConfig):
        for key in ("model", "strategy", "task"):
            if not isinstance(saved.get(key), DictConfig):
                raise ConfigError(f"{file} is not a complete run config (no '{key}' section): {fix}")
    return saved  # a list: check_saved_config names it


def _overridden(group: str) -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return any(
            o.split("=")[0].lstrip("+~") in (group,) or o.startswith(f"{group}.")
            for o in HydraConfig.get().overrides.task
        )
    except ValueError:  # not inside a Hydra job (tests, notebooks)
        return False
