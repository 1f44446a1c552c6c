"""The NeFT delta file: one format for the CLI's `<run>/neft_delta.safetensors` and the library's adapters.

A delta holds, per sliced weight, ``<module>.indices``, ``<module>.vectors`` (the trained values, linear
orientation) and ``<module>.axis`` (`sliced.delta_state`), optionally ``<module>.delta`` (impl=delta's trained
difference, so a delta impl reloads bit for bit). Its safetensors header holds strings only: ``format``
(`sliced.DELTA_FORMAT`), the base model's identity (``base_name``, ``base_name_or_path``, ``base_source``,
``base_dtype``), ``hash_scheme`` and ``base_hash`` (`sliced.base_hash` of the weights it touches, taken before
training) and ``content_sha256`` (of its own tensors). `write` is what `strategy=neft` exports and what
`NeuronModel.save_pretrained` writes; `read` + `check_base` are what `stage=eval`/`export` and
`NeuronModel.from_pretrained` read it with. Imports torch and safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.integrity import HASH_KEY, check_content_hash, content_hash
from neft_lab.io import apply_umask
from neft_lab.neurons import sliced

FILE = "neft_delta.safetensors"
IDENTITY_KEYS = ("name", "name_or_path", "source", "dtype")


def base_identity(**identity: Any) -> dict[str, str]:
    """The header's base-model fields from `name`, `name_or_path`, `source`, `dtype` (missing ones: "")."""
    unknown = sorted(set(identity) - set(IDENTITY_KEYS))
    if unknown:
        raise TypeError(f"base_identity() got unknown fields {unknown}; known: {IDENTITY_KEYS}")
    meta = {"hash_scheme": sliced.HASH_SCHEME}
    for key in IDENTITY_KEYS:
        value = identity.get(key)
        meta[f"base_{key}"] = "" if value is None else str(value)
    return meta


def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write a delta atomically (temporary sibling, then rename) with its format and content hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {**{k: str(v) for k, v in meta.items()}, "format": sliced.DELTA_FORMAT}
    header[HASH_KEY] = content_hash(tensors)  # a flipped bit is refused when the delta is read
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=header)
        apply_umask(tmp)  # safetensors writes 0600
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | Path) -> dict[str, str]:
    """The header of `path`, refused in one line unless it is a NeFT delta."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            meta = dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ConfigError(f"{path}: could not read it as a NeFT delta ({err})") from None
    if meta.get("format") != sliced.DELTA_FORMAT:
        raise ConfigError(
            f"{path} is a safetensors file but not a NeFT delta (format={meta.get('format')!r})"
        )
    return meta


def read(path: str | Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a delta, its format and content hash checked (`fix` ends the messages)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path} is truncated or damaged ({err}): {fix}") from None
    check_content_hash(tensors, meta.get(HASH_KEY), path, fix)
    return tensors, meta


def check_base(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    path: str | Path,
    model_label: str,
) -> bool:
    """Refuse, in one line naming both hashes, a `model` that is not the base the delta was trained on (the
    hash of the weights it touches). `model_label` names the model in the message. False: the delta records
    no hash (written before hashes), nothing was checked."""
    expected = meta.get("base_hash")
    if not expected:
        return False
    modules = sliced.delta_modules(tensors)
    found = sliced.base_hash(model, modules)
    if found != expected:
        raise ConfigError(
            f"{path} was trained on another base model: its base hash is {expected[:16]}, {model_label} "
            f"hashes {found[:16]} over the {len(modules)} weights it changes. Load the base it was trained on "
            f"(recorded: name={meta.get('base_name')!r} name_or_path={meta.get('base_name_or_path')!r} "
            f"source={meta.get('base_source')!r} dtype={meta.get('base_dtype')!r})"
        )
    return True
