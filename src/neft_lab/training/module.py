"""The LightningModule: a causal LM plus a strategy. It knows nothing of any particular method.

On several processes (`neft_lab.training.distributed`): it checks that the ranks start with the
same trainable parameters (NeFT: the same neurons) and, under DDP, end with identical weights, and
logs what DDP synchronises; under `trainer=fsdp`
(`ModelParallelStrategy`) `configure_model` trains an FSDP2-sharded copy of the model and
`on_fit_end` gathers the trained weights back into the original model on rank 0.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

from neft_lab.strategies.base import TrainingStrategy
from neft_lab.training import distributed
from neft_lab.training.loss import target_token_loss

logger = logging.getLogger(__name__)


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
        self._unsharded: list[nn.Module] = []  # FSDP2: the original model, while a sharded copy trains

    def setup(self, stage: str) -> None:
        """Several ranks must start alike: same neurons (each rank selects its own) and, as FSDP2 shards each
        rank's own copy (DDP broadcasts rank 0's), the same trainable values."""
        if self.trainer.world_size > 1:
            fsdp = isinstance(self.trainer.strategy, ModelParallelStrategy)
            distributed.check_replicas_agree(self.model, "before training", "trainable" if fsdp else "none")

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy (`trainer=fsdp`); nothing for other strategies."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or self._unsharded:
            return
        self._unsharded = [self.model]  # in a list: not a submodule, so neither moved nor sharded
        self.model = distributed.shard(self.model, self.device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        if isinstance(self.trainer.strategy, DDPStrategy) and self.trainer.is_global_zero:
            tensors, values = distributed.ddp_synchronised(self.trainer.strategy.model)
            logger.info("DDP synchronises %d parameter tensors, %d values", tensors, values)

    def on_fit_end(self) -> None:
        if self._unsharded:  # the trained weights go back into the plain model the pipeline holds
            plain = self._unsharded.pop()
            distributed.gather_into(self.model, plain, self.trainer.is_global_zero)
            self.model = plain
            self.strategy.sync(self.model)
        elif self.trainer.world_size > 1:
            count = distributed.check_replicas_agree(self.model, "after training", "all")
            if self.trainer.is_global_zero:
                ranks = self.trainer.world_size
                logger.info("replicas agree after training: %d tensors identical on %d ranks", count, ranks)

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

    def on_train_start(self) -> None:
        self.strategy.sync(self.model)  # a resumed run restored trainable tensors: push them into the weights

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
