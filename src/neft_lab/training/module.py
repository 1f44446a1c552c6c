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

from neft_lab.errors import ConfigError
from neft_lab.losses import target_token_loss, target_token_losses
from neft_lab.masters import keep_trainable_in
from neft_lab.strategies.base import GradNormProbe, TrainingStrategy
from neft_lab.training import distributed, precision
from neft_lab.training.options import CLIP_SCOPES, SCHEDULES

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
        scheduler: str = "linear",
        warmup_steps: int = 0,
        master_dtype: str | None = "float32",
        clip_scope: str = "selected",
        horizon: int | str | None = None,
        loss_average: str = "rank",
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode: dropout would stay off
        self.strategy = strategy
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.scheduler_name, self.warmup_steps = scheduler, warmup_steps
        self.loss_average = loss_average  # optim.loss_average: how several processes' token means combine
        self.horizon = parse_horizon(horizon)  # the schedule's length, when not the run's (NeFT references)
        keep_trainable_in(self.model, precision.master_dtype(master_dtype))  # float32 masters (precision.py)
        self._clip_probe = _clip_norm_probe(self.model, strategy, clip_scope)
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self._step_started = 0.0
        self._tokens = 0
        self._unsharded: list[nn.Module] = []  # FSDP2: the original model, while a sharded copy trains

    def setup(self, stage: str) -> None:
        """Several ranks must start alike: same neurons (each rank selects its own) and, as FSDP2 shards each
        rank's own copy (DDP broadcasts rank 0's), the same trainable values."""
        if self._clip_probe is not None and (
            self.trainer.world_size > 1 or self.trainer.accumulate_grad_batches > 1
        ):
            raise ConfigError(
                "optim.clip_scope=paper computes the authors' dense gradient norm from one backward on one "
                f"process (here {self.trainer.world_size} process(es), accumulate_grad_batches="
                f"{self.trainer.accumulate_grad_batches}): gradients summed over batches or ranks have another "
                "norm. Train on one device without accumulation (raise loader.batch_size), or use "
                "optim.clip_scope=selected"
            )
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
        self._tokens += int(batch["attention_mask"].sum())
        if self.loss_average == "global" and self.trainer.world_size > 1:
            loss, shown = global_token_mean(self.model, batch, self.trainer.world_size)
        else:
            loss, _ = target_token_loss(self.model, batch)
            shown = loss.detach()
        self.log("train/loss", shown, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
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
        total = schedule_steps(self.trainer, self.horizon) if self._trainer is not None else 1
        scheduler = lr_schedule(optimizer, self.scheduler_name, self.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the strategy's norm where it has one (`optim.clip_scope=paper` on NeFT: the authors' dense
        up/down norm); else Lightning's norm over the optimizer's parameters."""
        norm = None if self._clip_probe is None else self._clip_probe.take()
        if norm is None or not gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"strategy '{self.strategy.name}' clips by norm; got {gradient_clip_algorithm}")
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), norm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.strategy.sync(self.model)

    def on_train_start(self) -> None:
        self.strategy.sync(self.model)  # a resumed run restored trainable tensors: push them into the weights

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{k}" for k in self.strategy.trainable_state_dict(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["strategy"] = self.strategy.name


def _clip_norm_probe(model: nn.Module, strategy: TrainingStrategy, scope: str) -> GradNormProbe | None:
    """The strategy's probe of the norm to clip by under `optim.clip_scope=scope`, or None (the optimizer's
    parameters' norm)."""
    if scope not in CLIP_SCOPES:
        raise ConfigError(f"unknown optim.clip_scope '{scope}': choose one of {CLIP_SCOPES}")
    return strategy.clip_norm_probe(model, scope)


def global_token_mean(
    model: nn.Module, batch: dict[str, torch.Tensor], world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`optim.loss_average=global`: the loss to backpropagate and the step's loss over every rank's target tokens.

    DDP and FSDP2 average gradients over ranks, so this rank's token sum is scaled by world_size over the
    step's token count on all ranks: the averaged gradient is then the one one process gets from the whole
    batch, however the tokens fall between ranks. (Under gradient accumulation each micro-batch is one step.)"""
    losses, _ = target_token_losses(model, batch)
    total = losses.sum()
    counted = torch.stack([total.detach(), torch.tensor(float(losses.numel()), device=total.device)])
    torch.distributed.all_reduce(counted)
    step_total, step_tokens = counted[0], counted[1].clamp(min=1.0)
    return total * world_size / step_tokens, step_total / step_tokens


def parse_horizon(value: int | str | None, key: str = "optim.horizon") -> tuple[int, str] | None:
    """A schedule horizon: None (the run's own length), `<n>` optimizer steps or `<n>ep` epochs → (n, unit)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    text = str(value).strip().lower()
    for suffix in ("epochs", "epoch", "ep"):
        if text.endswith(suffix):
            number, unit = text[: -len(suffix)].strip(), "epochs"
            break
    else:
        number, unit = text, "steps"
    if isinstance(value, bool) or not number.isdigit() or int(number) < 1:
        raise ConfigError(
            f"{key}={value!r}: give a number of optimizer steps (e.g. 6400), a number of epochs (e.g. 2ep) "
            "or null (the run's own length)"
        )
    return int(number), unit


def schedule_steps(trainer: L.Trainer, horizon: tuple[int, str] | None) -> int:
    """The learning-rate schedule's length in optimizer steps: the whole run (Lightning's
    `estimated_stepping_batches`: max_steps, else max_epochs × steps per epoch, as Hugging Face's Trainer
    with num_train_epochs), or `horizon` when given, so a run stopped at max_steps can be a checkpoint
    on the way through a longer schedule."""
    if horizon is None:
        return max(int(trainer.estimated_stepping_batches), 1)
    count, unit = horizon
    if unit == "steps":
        return count
    if trainer.train_dataloader is None:  # what estimated_stepping_batches does before it counts batches
        trainer.fit_loop.setup_data()
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    return max(per_epoch * count, 1)


def lr_schedule(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int) -> Any:
    """Hugging Face's schedules (`transformers.get_scheduler`), so `linear` with no warmup is exactly the
    authors' (Trainer default: linear decay to 0)."""
    from transformers import get_scheduler

    if name not in SCHEDULES:
        raise ValueError(f"unknown optim.scheduler '{name}': choose one of {sorted(SCHEDULES)}")
    return get_scheduler(SCHEDULES[name], optimizer, num_warmup_steps=warmup, num_training_steps=total)
