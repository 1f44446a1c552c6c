"""Float32 master weights: every trainable tensor cast to one dtype in place, before the optimizer exists.

A foundation module (torch only), shared by the library (`library.neuron_model`) and the training loop
(`training.module`); why the trained tensors are float32 whatever the frozen base's dtype, and which
settings choose it: `training.precision`.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def keep_trainable_in(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Cast every trainable parameter to `dtype` in place (before the optimizer exists); returns how many moved.

    `dtype=None` leaves every tensor as it is. The Parameter objects stay the same (only `.data` changes), so
    strategies that hold references to them (fused slices, PEFT adapters) keep working.
    """
    if dtype is None:
        return 0
    moved = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            moved += 1
    return moved
