"""Content hashes and finiteness checks for the small safetensors artifacts (NeFT deltas, neuron sets, scores
files) and for weights about to be exported or scored.

Safetensors checks sizes, not values: a flipped bit in a tensor's bytes loads silently. Each artifact records
`content_hash(tensors)` when written and `check_content_hash` refuses it when the bytes no longer match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from neft_lab.errors import ConfigError

HASH_KEY = "content_sha256"  # the metadata field (safetensors header) that holds the digest


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_content_hash(
    tensors: dict[str, torch.Tensor], recorded: str | None, file: str | Path, fix: str
) -> None:
    """Refuse `tensors` whose hash differs from the one recorded when `file` was written (None: an older file
    that recorded none, accepted)."""
    if recorded is None:
        return
    found = content_hash(tensors)
    if found != recorded:
        raise ConfigError(
            f"{file} is damaged: its content hash is {found[:16]}, but {recorded[:16]} was recorded when it was "
            f"written (flipped bits, a partial copy or an edit): {fix}"
        )


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """(name, count) of the first floating-point tensor holding NaN or inf, else None."""
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.numel() and tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                return name, bad
    return None


def check_finite_weights(model: torch.nn.Module, source: str | Path) -> None:
    """Refuse to export or score a model whose weights hold NaN or inf (they evaluated to loss null, BLEU 0)."""
    found = first_non_finite(model.state_dict().items())
    if found is not None:
        name, bad = found
        raise ConfigError(
            f"{source} holds non-finite weights ({bad} NaN/inf values in {name}): the run diverged or the file is "
            "damaged; retrain with a lower optim.lr (or resume from an earlier checkpoint), or re-create the file"
        )
