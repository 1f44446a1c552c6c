"""Generate on a split and score it: the one evaluation path for before/after training and saved runs."""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from neft_lab.data.encoding import PromptEncoder
from neft_lab.data.examples import Example
from neft_lab.evaluation.generate import generate_predictions
from neft_lab.evaluation.metrics import score

logger = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: list[Example],
    batch_size: int = 16,
    comet_model: str = "Unbabel/wmt22-comet-da",
    desc: str = "evaluate",
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Metrics of the task on `examples` and one row per example (source, reference, prediction)."""
    started = time.perf_counter()
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
