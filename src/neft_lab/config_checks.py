"""The pieces of a config check, each stage composes its own from them (`neft_lab.stages.<name>.check`).

Reading a value (`value_of`, `resolving`: OmegaConf's missing and unresolvable values as one-line errors),
numbers with a rule (`number`, `require_int`, `require_number`), and the checks of the config sections that
several stages share: seed, threads, evaluation, task, optimizer, loader, trainer and devices, model and
strategy, a writable folder. Checks that belong to a component live there and are called from here, so each
has one home:

- model source, name and dtype: `models.loading.check_model_config` (`torch_dtype`);
- precision and master dtype: `training.precision.check_precision` / `master_dtype`;
- scheduler, clip scope and loss average: `SCHEDULES` / `CLIP_SCOPES` / `LOSS_AVERAGES` of `training.options`;
- strategy arguments: the strategies' constructors (`build_strategy`) and their `check_config` (LoRA's
  `r=match` budget; NeFT's selection: `selection_workflow.check_selection`, with `Budget.check`);
- task: `Task.from_config` (metrics, prompt, token limits), `Task.check_folders` (local data folders and files)
  and, for the ifeval metric, `evaluation.ifeval.check_available` (the `ifeval` extra).

Nothing here imports torch at module level: the CLI checks a config before torch, transformers and Lightning
are imported, so a typo costs about a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from neft_lab.errors import ConfigError
from neft_lab.training.options import (
    CLIP_SCOPES,
    EVAL_PRECISIONS,
    LOSS_AVERAGES,
    SCHEDULES,
    check_master_dtype,
)


def check_common(cfg: DictConfig) -> None:
    """What every stage that loads a model checks: seed, threads, evaluation settings and the task."""
    seed = value_of(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r}: a seed must be an integer in [0, 2**32), e.g. seed=0")
    check_threads(cfg)
    require_int(cfg, "eval.batch_size", 1, 16)
    require_int(cfg, "loader.eval_batch_size", 1, 16)
    eval_precision = value_of(cfg, "eval.precision")
    if eval_precision is not None and str(eval_precision) not in EVAL_PRECISIONS:
        raise ConfigError(
            f"eval.precision={eval_precision}: choose one of {', '.join(EVAL_PRECISIONS)} (auto: as trained)"
        )
    check_task(cfg)


def check_training(cfg: DictConfig) -> None:
    """What every stage that trains checks: optimizer, loader and trainer."""
    check_optim(cfg)
    require_int(cfg, "loader.batch_size", 1, 8)
    require_int(cfg, "loader.num_workers", 0)
    group_by_length = value_of(cfg, "loader.group_by_length")  # None: a run saved before the option existed
    if group_by_length is not None and not isinstance(group_by_length, bool):
        raise ConfigError(f"loader.group_by_length={group_by_length!r}: give true or false")
    check_trainer(cfg)


def check_saved_result(cfg: DictConfig, stage: str) -> None:
    """`ckpt=`, the saved result stage=eval/export reads (its model, strategy and task come from its run)."""
    ckpt = value_of(cfg, "ckpt")
    if not ckpt:
        raise ConfigError(
            f"stage={stage} needs ckpt=<run folder, export folder, neft_delta.safetensors or .ckpt file>"
        )
    if not Path(str(ckpt)).expanduser().exists():
        raise ConfigError(
            f"ckpt={ckpt} does not exist: give a run folder, its export/ folder, its neft_delta.safetensors "
            "or a .ckpt file"
        )


def check_writable_folder(cfg: DictConfig, key: str) -> None:
    """The folder at `key` exists as a folder, or can be created, and takes files; checked by creating and
    removing a temporary folder in it (or in its nearest existing parent), so nothing is left behind."""
    import tempfile

    value = value_of(cfg, key)
    folder = Path(str(value)).expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    fix = f"point {key} at a writable folder (paths.cache_dir also follows NEFT_LAB_CACHE)"
    if existing is None or not existing.is_dir():
        raise ConfigError(f"{key}={value} is not writable ({existing} is not a folder): {fix}")
    try:
        Path(tempfile.mkdtemp(prefix=".neft_lab_probe.", dir=existing)).rmdir()
    except OSError as err:
        raise ConfigError(f"{key}={value} is not writable ({err.strerror} in {existing}): {fix}") from None


# ---- helpers (also used by the components' own checks) ------------------------------------------------------
def value_of(cfg: DictConfig, key: str) -> Any:
    """The resolved value at a dotted key (None when absent); a failing interpolation becomes a ConfigError."""
    with resolving(key):
        return OmegaConf.select(cfg, key, throw_on_missing=True)


@contextmanager
def resolving(key: str) -> Iterator[None]:
    """Turn OmegaConf's errors for a missing (`???`) or unresolvable value under `key` into one-line ConfigErrors."""
    try:
        yield
    except MissingMandatoryValue as err:
        where = getattr(err, "full_key", None) or key
        raise ConfigError(f"{where} is not set: give it on the command line, e.g. {where}=<value>") from None
    except InterpolationResolutionError as err:
        cause = err.__cause__ or err.__context__
        while isinstance(cause, InterpolationResolutionError):  # nested interpolations
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConfigError):  # our resolvers' own messages (budget=abc)
            raise ConfigError(str(cause)) from None
        where = getattr(err, "full_key", None) or key
        reason = str(cause or err).strip().splitlines()[0]
        raise ConfigError(f"{where} cannot be resolved ({reason}): fix the value it refers to") from None


def number(value: Any, key: str, rule: str, ok: Callable[[float], bool], example: str = "") -> float:
    """`value` as a finite number that satisfies `ok`, else a ConfigError saying `key` must be `rule`."""
    good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not good or not ok(float(value)):
        hint = f", e.g. {key}={example}" if example else ""
        raise ConfigError(f"{key}={value!r}: must be a number {rule}{hint}")
    return float(value)


def require_number(
    cfg: DictConfig, key: str, rule: str, ok: Callable[[float], bool], example: str = ""
) -> float:
    return number(value_of(cfg, key), key, rule, ok, example)


def require_int(cfg: DictConfig, key: str, minimum: int, example: int | None = None) -> int:
    """A whole number >= `minimum` at `key` (True/False and 2.5 are refused)."""
    value = value_of(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        shown = minimum if example is None else example
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}, e.g. {key}={shown}")
    return value


# ---- the sections ------------------------------------------------------------------------------------------
def check_optim(cfg: DictConfig) -> None:
    require_number(cfg, "optim.lr", "> 0", lambda v: v > 0, "2e-5")
    require_number(cfg, "optim.weight_decay", ">= 0", lambda v: v >= 0, "0.0")
    betas = value_of(cfg, "optim.betas")
    if not isinstance(betas, (list, tuple, ListConfig)) or len(betas) != 2:
        shown = list(betas) if isinstance(betas, ListConfig) else betas
        raise ConfigError(f"optim.betas={shown!r}: give two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]")
    for i, beta in enumerate(betas):
        number(beta, f"optim.betas[{i}]", "in [0, 1)", lambda v: 0 <= v < 1, "0.9")
    require_number(cfg, "optim.eps", "> 0", lambda v: v > 0, "1e-8")
    scheduler = value_of(cfg, "optim.scheduler")
    if scheduler not in SCHEDULES:
        raise ConfigError(
            f"optim.scheduler={scheduler!r}: unknown scheduler, choose one of {sorted(SCHEDULES)}"
        )
    require_int(cfg, "optim.warmup_steps", 0)
    check_master_dtype(value_of(cfg, "optim.master_dtype"))
    clip_scope = value_of(cfg, "optim.clip_scope")
    if clip_scope not in CLIP_SCOPES:
        raise ConfigError(f"optim.clip_scope={clip_scope!r}: unknown clip scope, choose one of {CLIP_SCOPES}")
    loss_average = value_of(cfg, "optim.loss_average")
    if loss_average not in LOSS_AVERAGES:
        raise ConfigError(
            f"optim.loss_average={loss_average!r}: unknown, choose one of {LOSS_AVERAGES} (rank: each process's "
            "token mean, the authors' Trainer; global: the mean over every process's tokens, as one process)"
        )


def check_trainer(cfg: DictConfig) -> None:
    if value_of(cfg, "trainer.max_steps") == -1:  # a run of max_epochs epochs (the paper presets)
        epochs = value_of(cfg, "trainer.max_epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"trainer.max_steps=-1: must be an integer >= 1, or -1 with trainer.max_epochs >= 1 (here "
                f"trainer.max_epochs={epochs!r}): give trainer.max_steps=200 (optimizer steps) or "
                "trainer.max_epochs=2 (epochs)"
            )
    else:
        require_int(cfg, "trainer.max_steps", 1, 200)
    interval = value_of(cfg, "trainer.val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        require_int(cfg, "trainer.val_check_interval", 1, 50)
    elif interval is not None:  # Lightning: a float is a fraction of the training epoch
        number(
            interval,
            "trainer.val_check_interval",
            "in (0, 1] (a share of an epoch) or an integer >= 1 (optimizer steps)",
            lambda v: 0 < v <= 1,
            "50",
        )
    epochs = value_of(cfg, "trainer.max_epochs")
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < -1 or epochs == 0
    ):
        raise ConfigError(
            f"trainer.max_epochs={epochs!r}: must be an integer >= 1, or -1 (no limit: trainer.max_steps ends "
            "the run), e.g. trainer.max_epochs=-1"
        )
    check_devices(cfg)
    precision = value_of(cfg, "trainer.precision")
    if str(precision) not in LIGHTNING_PRECISIONS or isinstance(precision, (bool, float)):
        raise ConfigError(
            f"trainer.precision={precision!r}: unknown precision, choose one of {', '.join(LIGHTNING_PRECISIONS[:6])} "
            "(e.g. trainer.precision=32-true on CPU, bf16-mixed on a GPU)"
        )
    limit = value_of(cfg, "trainer.limit_val_batches")
    if limit is not None:
        number(
            limit,
            "trainer.limit_val_batches",
            "in [0, 1] (a share of the validation set) or an integer >= 0 (batches)",
            lambda v: v >= 0 and (v <= 1 or float(v).is_integer()),
            "1.0",
        )
    if value_of(cfg, "trainer.accumulate_grad_batches") is not None:
        require_int(cfg, "trainer.accumulate_grad_batches", 1)
    if value_of(cfg, "trainer.gradient_clip_val") is not None:
        require_number(
            cfg, "trainer.gradient_clip_val", ">= 0 (0 or null: no clipping)", lambda v: v >= 0, "1.0"
        )


LIGHTNING_PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "bf16",
    "64",
)
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")


def check_devices(cfg: DictConfig) -> None:
    """trainer.accelerator/devices/num_nodes as Lightning takes them, and a GPU accelerator only where CUDA is
    (otherwise Lightning refuses only once the model is loaded and scored zero-shot)."""
    accelerator = value_of(cfg, "trainer.accelerator")
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r}: choose one of {', '.join(ACCELERATORS)} (or trainer=cpu / trainer=gpu)"
        )
    devices = value_of(cfg, "trainer.devices")
    ok = devices == "auto" or devices == -1
    if isinstance(devices, int) and not isinstance(devices, bool):
        ok = ok or devices >= 1
    elif isinstance(devices, (list, tuple, ListConfig)):
        ok = len(devices) > 0 and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices
        )
    elif isinstance(devices, str) and devices != "auto":
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        ok = bool(parts) and all(p.isdigit() for p in parts) and (len(parts) > 1 or int(parts[0]) >= 1)
    if not ok:
        raise ConfigError(
            f"trainer.devices={devices!r}: give a number of devices >= 1, a list of device ids ([0,1]), -1 or auto, "
            "e.g. trainer.devices=1"
        )
    if value_of(cfg, "trainer.num_nodes") is not None:
        require_int(cfg, "trainer.num_nodes", 1)
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator}: no CUDA GPU is visible on this machine; run on CPU with "
                "trainer=cpu (or trainer.accelerator=cpu trainer.precision=32-true), or where a GPU is"
            )


def check_task(cfg: DictConfig) -> None:
    from neft_lab.data.task import Task

    with resolving("task"):
        task = Task.from_config(cfg.task)
    task.check_folders()
    if "ifeval" in task.metrics:  # the `ifeval` extra: a missing package is one line now, not after training
        from neft_lab.evaluation.ifeval import check_available

        check_available()


def check_model_and_strategy(cfg: DictConfig) -> None:
    from neft_lab.models.loading import check_model_config
    from neft_lab.strategies import build_strategy
    from neft_lab.training.precision import check_precision

    with resolving("model"):
        check_model_config(cfg.model)
    check_precision(
        value_of(cfg, "model.dtype"), value_of(cfg, "trainer.precision"), value_of(cfg, "optim.master_dtype")
    )
    with resolving("strategy"):
        strategy = build_strategy(cfg.strategy)
        strategy.check_config(cfg)
    quantization = value_of(cfg, "model.quantization")
    if quantization is not None and strategy.quantized_base is None:
        raise ConfigError(
            f"model.quantization={quantization} with strategy={strategy.name}: a 4-bit base stays frozen, and this "
            "strategy trains every weight; use strategy=neft or strategy=lora (QLoRA), or model.quantization=null"
        )
    if getattr(strategy, "uses_selection", False) or value_of(cfg, "model.source") == "gemma_gguf":
        check_writable_folder(cfg, "paths.cache_dir")  # the reference run, scores, the converted Gemma


def check_threads(cfg: DictConfig) -> None:
    """`threads`: null (torch's count), auto (the cores idle at start-up) or a count >= 1."""
    if value_of(cfg, "threads") is not None and str(value_of(cfg, "threads")) != "auto":
        require_int(cfg, "threads", 1)
