"""Per-example target-token loss for evaluation's paired bootstrap; the loss itself is `neft_lab.losses`."""

from __future__ import annotations

import torch
from torch import nn

from neft_lab.losses import target_token_losses


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target-token loss and target-token count of each row of `batch` (the units a paired
    bootstrap over test segments resamples)."""
    losses, rows = target_token_losses(model, batch)
    n = batch["labels"].shape[0]
    sums = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
    counts = torch.zeros(n, dtype=torch.long, device=losses.device).index_add_(0, rows, torch.ones_like(rows))
    return sums, counts
