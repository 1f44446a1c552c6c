"""Lightning data module: loads a task's splits once, encodes them, serves training/validation batches."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

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
        return DataLoader(
            self.encoded["train"],
            batch_size=self.batch_size,
            shuffle=True,
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
