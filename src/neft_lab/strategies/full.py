"""Full fine-tuning: every parameter trains; the export is a plain Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from neft_lab.io import atomic_dir
from neft_lab.strategies.base import StrategyContext, TrainingStrategy


class FullFineTuning(TrainingStrategy):
    name = "full"
    quantized_base = None  # every weight trains: nothing stays frozen to store in 4 bits

    def __init__(self, train_embeddings: bool = True) -> None:
        self.train_embeddings = train_embeddings

    def apply(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        if not self.train_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        return out_dir
