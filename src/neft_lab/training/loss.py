"""Cross-entropy over target tokens only, with logits computed only where the loss needs them.

Gemma-3's LM head has 262k outputs: projecting every position costs more than the rest of a
small model. transformers' `logits_to_keep` accepts a boolean (batch, seq) mask, so the head
runs on the target positions alone (the model still applies its own final soft-capping).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from neft_lab.data.encoding import IGNORE_INDEX


def _mask_slicing_supported() -> bool:
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    return "torch.bool" in inspect.getsource(slice_logits_to_keep)


MASK_SLICING = _mask_slicing_supported()


def target_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over the target tokens of `batch`, and how many tokens it covers."""
    losses, _ = target_token_losses(model, batch)
    return losses.mean(), int(losses.numel())


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target-token loss and target-token count of each row of `batch` (the units a paired
    bootstrap over test segments resamples)."""
    losses, rows = target_token_losses(model, batch)
    n = batch["labels"].shape[0]
    sums = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
    counts = torch.zeros(n, dtype=torch.long, device=losses.device).index_add_(0, rows, torch.ones_like(rows))
    return sums, counts


def target_token_losses(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token loss of every target token of `batch` (row-major) and the row each belongs to."""
    labels = batch["labels"]
    next_labels = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = next_labels != IGNORE_INDEX
    targets = next_labels[next_labels != IGNORE_INDEX]
    if MASK_SLICING:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
            use_cache=False,
        ).logits
    else:  # older transformers: keep the smallest column range that covers every target position
        columns = keep.any(dim=0).nonzero().squeeze(-1)
        start, stop = int(columns.min()), int(columns.max()) + 1
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=torch.arange(start, stop, device=labels.device),
            use_cache=False,
        ).logits
        logits = logits[keep[:, start:stop]]
    logits = logits.reshape(-1, logits.shape[-1])
    rows = keep.nonzero()[:, 0]  # both the kept logits and the targets are in row-major order
    return F.cross_entropy(logits.float(), targets, reduction="none"), rows
