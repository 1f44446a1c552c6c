"""Cross-entropy over target tokens only, with logits computed only where the loss needs them.

A foundation module (torch only; transformers is looked at, never required): the training loop
(`training.module`), evaluation (`training.loss.per_example_loss`), the data collator (`IGNORE_INDEX`)
and the gradient scorer (`neurons.scorers.gradient`) share this one definition of the loss.

Gemma-3's LM head has 262k outputs: projecting every position costs more than the rest of a
small model. transformers' `logits_to_keep` accepts a boolean (batch, seq) mask, so the head
runs on the target positions alone (the model still applies its own final soft-capping).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label of a position that carries no loss (prompt, padding): PyTorch's default
MASK_SLICING: bool | None = None  # None: ask transformers on first use (`mask_slicing_supported`)


@functools.cache
def mask_slicing_supported() -> bool:
    """Whether this transformers' `logits_to_keep` takes a boolean mask (else only a column range).

    Asked on first use, not at import: importing `transformers.modeling_utils` takes seconds, and the data
    side (`IGNORE_INDEX`) needs none of it."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    return "torch.bool" in inspect.getsource(slice_logits_to_keep)


def target_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over the target tokens of `batch`, and how many tokens it covers."""
    losses, _ = target_token_losses(model, batch)
    return losses.mean(), int(losses.numel())


def target_token_losses(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token loss of every target token of `batch` (row-major) and the row each belongs to."""
    labels = batch["labels"]
    next_labels = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = next_labels != IGNORE_INDEX
    targets = next_labels[next_labels != IGNORE_INDEX]
    if mask_slicing_supported() if MASK_SLICING is None else MASK_SLICING:
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
