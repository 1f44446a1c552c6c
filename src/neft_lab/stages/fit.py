"""`stage=fit`: train a strategy on a task in a run folder, resuming from its last checkpoint; keep the best
checkpoint by validation loss, export it (a merged folder, a PEFT adapter or a NeFT delta) and evaluate it
before and after training. A NeFT run first runs the selection chain it needs (`neft_lab.chain`, cached)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from neft_lab.config_checks import check_common, check_model_and_strategy, check_training
from neft_lab.errors import ConfigError
from neft_lab.io import atomic_write_json, atomic_write_jsonl
from neft_lab.stages import nested_run
from neft_lab.stages.eval import evaluate_split, print_outcome

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    check_common(cfg)
    check_training(cfg)
    check_model_and_strategy(cfg)


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Train `cfg.strategy` on `cfg.task` in `run_dir` (resuming from its last checkpoint), restore the best
    checkpoint by validation loss, export it, evaluate it; returns the main test metric."""
    # heavy imports here, not at the top: check() must stay light (neft_lab.stages)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from neft_lab import chain, tracking
    from neft_lab.data.datamodule import TaskDataModule
    from neft_lab.data.encoding import PromptEncoder
    from neft_lab.data.task import Task
    from neft_lab.models.loading import load_model, parameter_count
    from neft_lab.ranks import launched_as_rank_zero
    from neft_lab.results import main_metric
    from neft_lab.strategies import StrategyContext, build_strategy
    from neft_lab.training import checkpoints
    from neft_lab.training.distributed import uses_fsdp2
    from neft_lab.training.module import CausalLMModule
    from neft_lab.training.trainer import (
        best_score,
        build_trainer,
        finish_loggers,
        metric,
        preempted,
        restore_best,
    )

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
        group_by_length=bool(cfg.loader.get("group_by_length")),
    )
    datamodule.setup()
    ctx.datamodule = datamodule
    # LoRA: the adapters sit on the 4-bit layers; NeFT: slices cut from the exact weights first
    quantize = (lambda m, trainable: _quantize(m, cfg, trainable)) if cfg.model.get("quantization") else None
    model = strategy.apply_on_four_bits(model, ctx, quantize)
    summary = strategy.summary(model, base_parameters)
    where = "reference run dir" if nested_run() else "run dir"  # the NeFT reference run is nested in its run
    logger.info("%s\n%s: %s", _summary_line(cfg, summary), where, run_dir)

    results: dict[str, Any] = {"model": cfg.model.name, "task": task.name, "seed": cfg.seed, **summary}
    if (
        cfg.eval.before and launched_as_rank_zero()
    ):  # other ranks of a distributed launch would only repeat it
        model.to(evaluation_device(cfg))  # generate on the accelerator the run trains on, not on the CPU
        results["before"], _ = evaluate_split(cfg, model, encoder, datamodule, "before fine-tuning")

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
    stats = tracking.attach_run_stats(trainer, started)
    tracking.log_run_start(trainer, cfg, summary, getattr(strategy, "neuron_set", None))
    train_started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except SIGTERMException:  # Lightning stops at a step boundary and would exit 0
        preempted(trainer, cfg, run_dir)
    best = restore_best(module, trainer, run_dir)
    if launched_as_rank_zero():
        checkpoints.remove_untracked(run_dir / "checkpoints", trainer)  # e.g. an old best resumed from
    results["train"] = {
        "steps": trainer.global_step,
        "seconds": round(
            stats.train_seconds_before + time.perf_counter() - train_started, 2
        ),  # + earlier attempts
        "final_loss": metric(trainer, "train/loss") or stats.final_loss,  # also with nothing left to train
        "best_val_loss": best_score(trainer),
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
        results["after"], rows = evaluate_split(cfg, model, encoder, datamodule, "after fine-tuning")
        atomic_write_jsonl(run_dir / "predictions.jsonl", rows)
        for lg in trainer.loggers:
            lg.log_metrics(
                {f"test/{k}": v for k, v in results["after"].items() if isinstance(v, (int, float))},
                step=trainer.global_step,
            )
        tracking.log_predictions(trainer, rows, int(cfg.eval.get("log_predictions", 20)))
    results["wall_seconds"] = round(
        stats.wall_seconds(), 2
    )  # earlier attempts' too, up to their last checkpoint
    atomic_write_json(run_dir / "metrics.json", results)
    finish_loggers(trainer)
    print_outcome(results, run_dir)
    return main_metric(results.get("after"))


def _quantize(model: torch.nn.Module, cfg: DictConfig, include_trainable: bool = False) -> None:
    from neft_lab.models.loading import quantize_model

    count = quantize_model(model, cfg.model, include_trainable=include_trainable)
    logger.info(
        "model.quantization=%s: %d frozen linear layers stored in 4 bits", cfg.model.quantization, count
    )


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


def evaluation_device(cfg: DictConfig) -> torch.device:
    """The device this process will train on (Lightning's choice for accelerator=auto/gpu), known before the
    Trainer exists; the CPU under FSDP, whose sharding the Trainer sets up."""
    import torch

    from neft_lab.training.distributed import uses_fsdp2

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and not uses_fsdp2(cfg.trainer):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """Continue from <run>/checkpoints/last.ckpt when the run folder has one (resume=auto or a run folder)."""
    from neft_lab.training import checkpoints

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
