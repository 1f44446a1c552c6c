"""A saved result read back as a model: one home for what stage=eval, stage=export and stage=analyze load.

A saved result is a run folder, its `export/` folder (merged weights or a PEFT adapter), a NeFT delta
(`neft_delta.safetensors` or a `NeuronModel.save_pretrained` folder, applied to its checked base model) or a
Lightning `.ckpt`. `with_run_config` takes the model, strategy (and task unless `task=` is given) from the
run the result came from, so `ckpt=<run>` needs no other settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from neft_lab import run_folder
from neft_lab.config import overridden
from neft_lab.errors import ConfigError
from neft_lab.models.loading import load_model, load_pretrained, load_tokenizer, quantize_model, torch_dtype
from neft_lab.neurons import delta_file, reference_weights, sliced
from neft_lab.strategies import StrategyContext, TrainingStrategy, build_strategy
from neft_lab.strategies.lora import peft_sees_four_bit
from neft_lab.training import checkpoints

logger = logging.getLogger(__name__)


DELTA_FILE = delta_file.FILE


def delta_file_of(path: Path) -> Path | None:
    """`path` as a NeFT delta: the file itself, or a run folder (or a `NeuronModel.save_pretrained` folder) that
    holds one (and no merged export/)."""
    if path.is_file() and path.suffix == ".safetensors":
        delta_file.read_header(path)  # refused in one line unless it is a NeFT delta
        return path
    if path.is_dir() and not (path / "export").is_dir() and (path / DELTA_FILE).is_file():
        return path / DELTA_FILE
    return None


def base_plus_delta(cfg: DictConfig, delta_path: Path) -> tuple[torch.nn.Module, Any]:
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


def four_bit_base_plus_delta(cfg: DictConfig, delta_path: Path) -> tuple[torch.nn.Module, Any]:
    """A NeFT run on a 4-bit base (`model.quantization`) as it trained: its vectors as float32 slices over the
    checked base, whose linear layers are then stored in 4 bits (`NeuronModel.quantize_base`)."""
    from neft_lab.library import NeuronModel

    model, tokenizer = load_model(cfg.model)
    wrapped = NeuronModel.from_pretrained(model, delta_path)
    _log_quantized(cfg, wrapped.quantize_base(cfg.model.quantization, torch_dtype(cfg.model.dtype)))
    return wrapped.hf_model, tokenizer


def _log_quantized(cfg: DictConfig, count: int) -> None:
    logger.info(
        "model.quantization=%s: the saved run's base in 4 bits, as it trained (%d linear layers; "
        "model.quantization=null scores the trained tensors on the exact base)",
        cfg.model.quantization,
        count,
    )


def load_saved_model(cfg: DictConfig, path: Path) -> tuple[torch.nn.Module, Any]:
    """A saved result as a model: full export folder, PEFT adapter folder, run folder, NeFT delta
    (`neft_delta.safetensors`, on its checked base model) or Lightning .ckpt. With `model.quantization` (a run
    on a 4-bit base, unless the command line sets it to null) the base is stored in 4 bits again, as it
    trained; a run folder is then read from its delta, not from a merged export."""
    quantization = cfg.model.get("quantization")
    delta = delta_file_of(path)
    if delta is None and quantization and path.is_dir() and (path / DELTA_FILE).is_file():
        delta = path / DELTA_FILE
    if delta is not None:
        return four_bit_base_plus_delta(cfg, delta) if quantization else base_plus_delta(cfg, delta)
    if path.is_dir() and (path / "export").is_dir():
        path = path / "export"
    if path.is_dir() and reference_weights.is_compact(path) and not (path / "config.json").exists():
        raise ConfigError(reference_weights.not_a_model(path.parent if path.name == "export" else path))
    if path.is_dir() and (path / "adapter_config.json").exists():
        from peft import PeftModel

        base, tokenizer = load_model(cfg.model)
        if quantization:  # QLoRA: the adapters over 4-bit layers
            _log_quantized(cfg, quantize_model(base, cfg.model, include_trainable=True))
        try:
            with peft_sees_four_bit(base):
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
        if quantization:
            logger.warning(
                "%s holds merged weights: scored on the exact base (a 4-bit base cannot hold trained vectors); "
                "pass the run folder or its neft_delta.safetensors to score the model as it trained",
                path,
            )
        return load_pretrained(path, torch_dtype(cfg.model.dtype), cfg.model), load_tokenizer(path, cfg.model)
    if path.is_file() and path.suffix == ".ckpt":
        model, tokenizer = load_model(cfg.model)
        strategy: TrainingStrategy = build_strategy(cfg.strategy)
        neuron_set = (
            path.parent.parent / "neuron_set.safetensors"
        )  # <run>/checkpoints/x.ckpt → <run>/neuron_set
        extras = {"neuron_set_file": neuron_set} if neuron_set.exists() else {}
        quantize = (
            (lambda m, trainable: _log_quantized(cfg, quantize_model(m, cfg.model, trainable)))
            if quantization
            else None
        )
        model = strategy.apply_on_four_bits(
            model, StrategyContext(cfg=cfg, extras=extras), quantize
        )  # as stage=fit
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


def with_run_config(cfg: DictConfig, path: Path) -> DictConfig:
    """For a run folder, reuse the model and strategy it was trained with (and its task unless task= is given)."""
    run_cfg_file = next(
        (p / "config.yaml" for p in (path, path.parent, path.parent.parent) if (p / "config.yaml").exists()),
        None,
    )
    if run_cfg_file is None:
        return cfg
    saved = saved_run_config(run_cfg_file)
    run_folder.check_saved_config(saved, cfg, run_cfg_file, keys=("model", "strategy", "task"))
    merged = OmegaConf.to_container(cfg, resolve=True)
    merged["model"] = OmegaConf.to_container(saved.model)
    if overridden("model.quantization"):  # e.g. null: a 4-bit run's tensors scored on the exact base
        merged["model"]["quantization"] = cfg.model.get("quantization")
    merged["strategy"] = OmegaConf.to_container(saved.strategy)
    if not overridden("task"):
        merged["task"] = OmegaConf.to_container(saved.task)
    return OmegaConf.create(merged)


def saved_run_config(file: Path) -> Any:
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


def as_plain_layers(model: torch.nn.Module) -> torch.nn.Module:
    """A loaded result with its adapters merged in: a PEFT model merged and unloaded, NeFT's sliced layers
    merged back into plain ones (a no-op for a merged folder)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    sliced.merge(model)
    return model
