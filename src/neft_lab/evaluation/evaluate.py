"""Generate on a split and score it: the one evaluation path for before/after training and saved runs.

Besides the task's metrics, the split's reference loss (mean next-token loss over the reference
targets, teacher-forced): a small or random model can learn a task long before its greedy output
scores any BLEU, and this is where that learning shows (the smoke runs).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from neft_lab.data.encoding import PromptEncoder, TrainCollator
from neft_lab.data.examples import Example
from neft_lab.evaluation.generate import generate_predictions
from neft_lab.evaluation.metrics import score
from neft_lab.training.loss import target_token_loss

logger = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: list[Example],
    batch_size: int = 16,
    comet_model: str = "Unbabel/wmt22-comet-da",
    desc: str = "evaluate",
    loss: bool = True,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Metrics of the task on `examples` (and their reference loss) and one row per example (source,
    reference, prediction)."""
    started = time.perf_counter()
    reference_loss = target_loss(model, encoder, examples, batch_size) if loss else None
    predictions = generate_predictions(model, encoder, examples, batch_size=batch_size, desc=desc)
    sources = [e.source for e in examples]
    references = [e.target for e in examples]
    metrics = score(
        encoder.task.metrics,
        sources,
        predictions,
        references,
        encoder.task.target_lang,
        comet_model,
        bleu_lowercase=encoder.task.bleu_lowercase,
    )
    if reference_loss is not None:
        metrics = {"loss": round(reference_loss, 4), **metrics}
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    rows = [
        {"source": s, "reference": r, "prediction": p} for s, r, p in zip(sources, references, predictions)
    ]
    return metrics, rows


def format_metrics(metrics: dict[str, Any]) -> str:
    shown = {  # scores only: not the BLEU signature string
        k: v for k, v in metrics.items() if k not in ("n", "seconds") and isinstance(v, (int, float))
    }
    return (
        "  ".join(f"{k}={v:.2f}" for k, v in shown.items())
        + f"  (n={metrics.get('n')}, {metrics.get('seconds')} s)"
    )


@torch.no_grad()
def target_loss(
    model: nn.Module, encoder: PromptEncoder, examples: list[Example], batch_size: int = 16
) -> float:
    """Mean next-token loss over all reference target tokens of `examples` (token-weighted, as in training)."""
    if not examples:
        return float("nan")
    tokenizer = encoder.tokenizer
    collate = TrainCollator(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    encoded = encoder.encode_all(examples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size]).items()}
            value, count = target_token_loss(model, batch)
            total += float(value) * count
            tokens += count
    finally:
        model.train(was_training)
    return total / max(tokens, 1)
