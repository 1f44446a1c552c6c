"""Lightning data module: loads a task's splits once, encodes them, serves training/validation batches.

The training order is a pure function of (seed, epoch), and a resumed run starts inside the epoch
where its checkpoint was taken: an interrupted run sees exactly the batches an uninterrupted one would.
`loader.group_by_length=true` (HF Trainer's option of that name; off by default, as in the authors' runs) puts
examples of similar length in a batch: a batch is padded to its longest example, and on Alpaca a random batch of 8
is padded to ~1.7x its mean length (Gemma-3-270M, NeFT 9%: 5.8 → 3.9 s a step, benchmarks/table_cpu_speed.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

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
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.task = task
        self.encoder = encoder
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.group_by_length = group_by_length
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
        train = self.encoded["train"]
        lengths = [len(e.input_ids) for e in train] if self.group_by_length else None
        sampler = EpochShuffleSampler(len(train), self.seed, rank, world, lengths, self.batch_size)
        if trainer is not None and trainer.global_step:  # resuming: Lightning restored the step before asking
            batches_per_epoch = math.ceil(len(sampler) / self.batch_size)
            consumed = trainer.global_step * trainer.accumulate_grad_batches
            sampler.start_at(consumed // batches_per_epoch, (consumed % batches_per_epoch) * self.batch_size)
        return DataLoader(
            train,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        validation = self.encoded["validation"]
        if self.group_by_length:  # longest first: the same token-weighted loss, less padding
            validation = sorted(validation, key=lambda e: -len(e.input_ids))
        return DataLoader(
            validation,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )


MEGABATCH_BATCHES = 50  # HF's LengthGroupedSampler: sort within 50 batches of the shuffled order


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch), dealt out to the ranks of a distributed run
    (so Lightning must not wrap it: `use_distributed_sampler: false`); can start part-way into an epoch.

    With `lengths`, each run of MEGABATCH_BATCHES steps' worth of the permutation is sorted by length and cut into
    steps (batch_size x world examples), whose order is then shuffled: a step's batches (on every rank) hold
    examples of similar length, and the run's steps come in random order, not longest to shortest (HF's
    LengthGroupedSampler keeps the sorted order: a short run would see only the longest examples)."""

    def __init__(
        self,
        size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.lengths, self.batch_size = lengths, batch_size
        self.epoch, self.skip = 0, 0

    def start_at(self, epoch: int, skip: int) -> None:
        """Begin in `epoch`, after this rank's first `skip` samples (those were trained on before a restart)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is not None:
            step = self.batch_size * self.world
            order = grouped_by_length(order, self.lengths, MEGABATCH_BATCHES * step, step, generator)
        order += order[: len(self) * self.world - self.size]  # pad so every rank gets as many samples
        mine = order[self.rank :: self.world][self.skip :]
        self.epoch, self.skip = self.epoch + 1, 0
        yield from mine


def grouped_by_length(
    order: list[int], lengths: Sequence[int], megabatch: int, step: int, generator: torch.Generator
) -> list[int]:
    """`order` cut into runs of `megabatch` examples; each run sorted longest first (ties keep their order), cut
    into steps of `step` examples, and its full steps shuffled (a last, partial step stays last)."""
    grouped: list[int] = []
    for start in range(0, len(order), megabatch):
        run = sorted(order[start : start + megabatch], key=lambda i: -lengths[i])
        full = len(run) // step
        for k in torch.randperm(full, generator=generator).tolist():
            grouped += run[k * step : (k + 1) * step]
        grouped += run[full * step :]
    return grouped
