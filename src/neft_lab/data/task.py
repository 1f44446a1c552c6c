"""A task = prompt template + target language + metrics + data sources, read from `conf/task/*.yaml`."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neft_lab.data import sources
from neft_lab.data.embedded import embedded_splits
from neft_lab.data.examples import Example
from neft_lab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
KNOWN_METRICS = {"bleu", "chrf", "rouge", "comet"}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "translation" or "summarization"
    source_lang: str
    target_lang: str
    prompt: str  # format string with {source}
    metrics: tuple[str, ...]
    target_prefix: str = " "
    stop: tuple[str, ...] = ("\n",)
    max_prompt_tokens: int = 256
    max_target_tokens: int = 128
    max_new_tokens: int = 128
    truncate_source: bool = False
    # case-insensitive BLEU (`sacrebleu --lowercase`), as the paper's authors scored
    bleu_lowercase: bool = False
    data: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, cfg: Any) -> Task:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
        metrics = tuple(raw.get("metrics", ()))
        unknown = set(metrics) - KNOWN_METRICS
        if unknown:
            raise ConfigError(
                f"task {raw.get('name')}: unknown metric(s) {sorted(unknown)}; choose from {sorted(KNOWN_METRICS)}"
            )
        if "{source}" not in raw.get("prompt", ""):
            raise ConfigError(
                f"task {raw.get('name')}: task.prompt must contain '{{source}}' where the input goes"
            )
        return cls(
            name=raw["name"],
            kind=raw["kind"],
            source_lang=raw["source_lang"],
            target_lang=raw["target_lang"],
            prompt=raw["prompt"],
            metrics=metrics,
            target_prefix=raw.get("target_prefix", " "),
            stop=tuple(raw.get("stop") or ()),
            max_prompt_tokens=_tokens(raw, "max_prompt_tokens"),
            max_target_tokens=_tokens(raw, "max_target_tokens"),
            max_new_tokens=_tokens(raw, "max_new_tokens"),
            truncate_source=bool(raw.get("truncate_source", False)),
            bleu_lowercase=_flag(raw, "bleu_lowercase"),
            data=dict(raw.get("data") or {}),
        )

    def check_folders(self) -> None:
        """The local folders this task would read exist (checked before any model or data is loaded)."""
        if self.data.get("source", "auto") in ("embedded", "hub"):
            return
        for key in ("data_dir", "train_dir", "val_dir", "test_dir"):
            if self.data.get(key):
                sources.data_folder(self.data[key], f"task.data.{key}")

    def format_prompt(self, source: str) -> str:
        return self.prompt.format(source=source)

    def load_splits(self, seed: int = 0) -> dict[str, list[Example]]:
        """Train, validation and test examples, with the size limits of `task.data` applied."""
        data = self.data
        kind = data.get("source", "auto")
        if kind == "auto":
            has_local = any(data.get(k) for k in ("data_dir", "train_dir", "test_dir"))
            kind = "local" if has_local else ("hub" if (data.get("hub") or {}).get("path") else None)
        if kind == "embedded":
            emb = data.get("embedded") or {}
            splits = embedded_splits(
                int(emb.get("n_train", 2000)),
                int(emb.get("n_val", 100)),
                int(emb.get("n_test", 100)),
                int(emb.get("seed", 0)),
            )
        elif kind == "local":
            splits = self._load_local()
        elif kind == "hub":
            splits = self._load_hub()
        else:
            raise ConfigError(
                f"task {self.name} has no data source. Point it at local files, e.g. "
                f"task.data.train_dir=/path/with/train.{self.source_lang}+train.{self.target_lang} "
                f"task.data.test_dir=/path/with/test.{self.source_lang}+test.{self.target_lang} "
                "(or task.data.data_dir=... for one folder holding every split), or set task.data.hub.path."
            )
        if not splits.get("validation"):
            splits["train"], splits["validation"] = _hold_out(
                splits["train"], int(data.get("val_size", 200)), seed
            )
        for split, key in zip(SPLITS, ("max_train", "max_val", "max_test")):
            limit = data.get(key)
            if limit is not None:
                splits[split] = splits[split][: int(limit)]
            if not splits[split]:
                raise DataError(f"task {self.name}: the {split} split is empty")
        logger.info("task %s: %s", self.name, ", ".join(f"{len(splits[s])} {s}" for s in SPLITS))
        return splits

    def _load_local(self) -> dict[str, list[Example]]:
        data = self.data
        fields = (data.get("source_field", "source"), data.get("target_field", "target"))
        base = data.get("data_dir")
        dirs = {s: data.get(f"{k}_dir") or base for s, k in zip(SPLITS, ("train", "val", "test"))}
        names = {
            s: data.get(f"{k}_split", d)
            for s, k, d in zip(SPLITS, ("train", "val", "test"), ("train", "valid", "test"))
        }
        for split in ("train", "test"):
            if not dirs[split]:
                raise ConfigError(
                    f"task {self.name}: no folder for the {split} split: set task.data.{'train' if split == 'train' else 'test'}_dir"
                )
        splits: dict[str, list[Example]] = {}
        for split in SPLITS:
            folder = dirs[split]
            if split == "validation" and (
                not folder or not _has_split(Path(folder), names[split], self.source_lang, self.target_lang)
            ):
                splits[split] = []
                continue
            splits[split] = sources.read_local_split(
                folder, names[split], self.source_lang, self.target_lang, *fields
            )
        return splits

    def _load_hub(self) -> dict[str, list[Example]]:
        hub = self.data["hub"]
        fields = (
            hub.get("source_field", self.data.get("source_field")),
            hub.get("target_field", self.data.get("target_field")),
        )
        limits = {
            "train": self.data.get("max_train"),
            "validation": self.data.get("max_val"),
            "test": self.data.get("max_test"),
        }
        splits: dict[str, list[Example]] = {}
        for split, key in zip(SPLITS, ("train_split", "val_split", "test_split")):
            name = hub.get(key)
            splits[split] = (
                sources.read_hub_split(hub["path"], hub.get("name"), name, *fields, limits[split])
                if name
                else []
            )
        return splits


def _tokens(raw: dict[str, Any], key: str) -> int:
    """A token limit: a whole number >= 1."""
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"task.{key}={value!r}: a token limit must be an integer >= 1, e.g. task.{key}=256")
    return value


def _flag(raw: dict[str, Any], key: str) -> bool:
    """A true/false task setting; `bool("false")` would be True, so anything else is refused."""
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"task {raw.get('name')}: task.{key} must be true or false, got {value!r}")
    return value


def _has_split(folder: Path, split: str, source_lang: str, target_lang: str) -> bool:
    return (folder / f"{split}.{source_lang}").exists() or (folder / f"{split}.jsonl").exists()


def _hold_out(train: list[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random validation set from training data that ships none."""
    if size <= 0:
        raise ConfigError(
            "the task has no validation split and task.data.val_size <= 0: set task.data.val_size > 0"
        )
    if len(train) <= size:
        raise DataError(
            f"only {len(train)} training examples: too few to hold out task.data.val_size={size} for validation"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
