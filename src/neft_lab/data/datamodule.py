"""Lightning data module: loads a task's splits once, encodes them, serves training/validation batches.

The training order is a pure function of (seed, epoch), and a resumed run starts inside the epoch
where its checkpoint was taken: an interrupted run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from neft_lab.data.encoding import Encoded, PromptEncoder, TrainCollator
from neft_lab.data.examples import Example
from neft_lab.data.task import Task


class TaskDataModule(L.LightningDataModule):
    def __init__(
        self,
        task: Task,
        encoder: PromptEncoder,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.task = task
        self.encoder = encoder
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.splits: dict[str, list[Example]] | None = None
        self.encoded: dict[str, list[Encoded]] = {}
        pad = encoder.tokenizer.pad_token_id
        self.collate = TrainCollator(encoder.tokenizer.eos_token_id if pad is None else pad)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.task.load_splits(self.seed)
        for split in ("train", "validation"):
            if split not in self.encoded:
                self.encoded[split] = self.encoder.encode_all(self.splits[split])

    def examples(self, split: str) -> list[Example]:
        self.setup()
        assert self.splits is not None
        return self.splits[split]

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochShuffleSampler(len(self.encoded["train"]), self.seed, rank, world)
        if trainer is not None and trainer.global_step:  # resuming: Lightning restored the step before asking
            batches_per_epoch = math.ceil(len(sampler) / self.batch_size)
            consumed = trainer.global_step * trainer.accumulate_grad_batches
            sampler.start_at(consumed // batches_per_epoch, (consumed % batches_per_epoch) * self.batch_size)
        return DataLoader(
            self.encoded["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.encoded["validation"],
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch), dealt out to the ranks of a distributed run
    (so Lightning must not wrap it: `use_distributed_sampler: false`); can start part-way into an epoch."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def start_at(self, epoch: int, skip: int) -> None:
        """Begin in `epoch`, after this rank's first `skip` samples (those were trained on before a restart)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: len(self) * self.world - self.size]  # pad so every rank gets as many samples
        mine = order[self.rank :: self.world][self.skip :]
        self.epoch, self.skip = self.epoch + 1, 0
        yield from mine
