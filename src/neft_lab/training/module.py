"""The LightningModule: a causal LM plus a strategy. It knows nothing of any particular method."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from neft_lab.strategies.base import TrainingStrategy
from neft_lab.training.loss import target_token_loss


class CausalLMModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        strategy: TrainingStrategy,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        scheduler: str = "constant",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode: dropout would stay off
        self.strategy = strategy
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.scheduler_name, self.warmup_steps = scheduler, warmup_steps
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self._step_started = 0.0
        self._tokens = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = target_token_loss(self.model, batch)
        self._tokens += int(batch["attention_mask"].sum())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n_tokens)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = target_token_loss(self.model, batch)
        self.log(
            "val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n_tokens, sync_dist=True
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()
        self._tokens = 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_started
        self.log("train/step_seconds", seconds, on_step=True, on_epoch=False)
        self.log("train/tokens_per_second", self._tokens / max(seconds, 1e-9), on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Any:
        groups = self.strategy.param_groups(self.model, self.weight_decay)
        if not groups:
            raise ValueError(f"strategy '{self.strategy.name}' left no trainable parameters")
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _schedule(self.scheduler_name, self.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.strategy.sync(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{k}" for k in self.strategy.trainable_state_dict(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["strategy"] = self.strategy.name


def _schedule(name: str, warmup: int, total: int):
    """Linear warmup, then constant, linear decay or cosine decay to zero."""
    if name not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown optim.scheduler '{name}': choose constant, linear or cosine")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        if name == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
