"""The strategy interface: the only code that knows how a model is made trainable.

The pipeline calls `prepare` before the model is loaded (NeFT runs its reference fine-tune there,
so two models never share memory) and `apply` once after. The LightningModule asks `param_groups`
for the optimizer, `clip_norm_probe` for the norm to clip by, calls `sync` after each step and after loading
a checkpoint, and uses `trainable_state_dict` / `export` to save.
A new method (NeFT and its baselines) is a new subclass; the training loop does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

NO_DECAY_HINTS = ("bias", "norm", "embed")


class GradNormProbe(Protocol):
    """What `TrainingStrategy.clip_norm_probe` returns: a norm measured over one backward."""

    def take(self) -> torch.Tensor:
        """The gradient norm measured since the last call (then reset)."""
        ...


@dataclass
class StrategyContext:
    """What a strategy may need beyond the model: the run's config, folders and data (NeFT's reference run)."""

    cfg: Any = None
    run_dir: Path | None = None
    cache_dir: Path | None = None
    datamodule: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


class TrainingStrategy(ABC):
    name: str = "base"
    # with model.quantization (a 4-bit frozen base, neurons/quantized.py): quantize the loaded model "before"
    # `apply` (LoRA: PEFT wraps the 4-bit layers, QLoRA), "after" it (NeFT: the slices are cut from the exact
    # weights, then their bases stored in 4 bits), or None: this strategy cannot train on a 4-bit base
    quantized_base: str | None = "after"

    def check_config(self, cfg: Any) -> None:
        """Refuse settings of the whole run config this strategy cannot train with; called before any model or
        data is loaded (`neft_lab.validation`) and again by `prepare`. Nothing by default."""

    def prepare(self, ctx: StrategyContext) -> None:
        """Work that must happen before the model is loaded (e.g. NeFT's reference run)."""
        if ctx.cfg is not None:
            self.check_config(ctx.cfg)

    @abstractmethod
    def apply(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        """Freeze what must not train; may wrap the model (PEFT). Returns the model to train."""

    def apply_on_four_bits(
        self, model: nn.Module, ctx: StrategyContext, quantize: Callable[[nn.Module, bool], Any] | None
    ) -> nn.Module:
        """`apply`, with `quantize(model, include_trainable)` storing the base in 4 bits where this strategy
        wants it (`quantized_base`); None: no quantization. One order for training and for reloading a run."""
        if quantize is not None and self.quantized_base == "before":
            quantize(model, True)
        model = self.apply(model, ctx)
        if quantize is not None and self.quantized_base == "after":
            quantize(model, False)
        return model

    def trainable_named_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay matrices, not biases, norms or embeddings."""
        decay, no_decay = [], []
        for name, param in self.trainable_named_parameters(model):
            (no_decay if param.ndim < 2 or any(h in name.lower() for h in NO_DECAY_HINTS) else decay).append(
                param
            )
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def sync(self, model: nn.Module) -> None:
        """Push trainable state kept outside the live weights into them (after a step or a checkpoint load)."""

    def clip_norm_probe(self, model: nn.Module, scope: str) -> GradNormProbe | None:
        """The gradient norm to clip by under `optim.clip_scope=scope`, where it is not the norm of the
        optimizer's gradients: a probe hooked into `model` (after `apply`) that measures it during each
        backward. None (the default, and every strategy's for `selected`): clip by the optimizer's parameters."""
        return None

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to restore training: only the trainable tensors."""
        trainable = {n for n, _ in self.trainable_named_parameters(model)}
        return {n: t for n, t in model.state_dict().items() if n in trainable}

    def summary(self, model: nn.Module, base_parameters: int) -> dict[str, Any]:
        trainable = sum(p.numel() for _, p in self.trainable_named_parameters(model))
        return {
            "strategy": self.name,
            "trainable_parameters": trainable,
            "total_parameters": base_parameters,
            "trainable_percent": 100.0 * trainable / max(base_parameters, 1),
        }

    @abstractmethod
    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """Write the trained result as a Hugging Face folder (or PEFT adapter) that `stage=eval` reads back."""

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model
