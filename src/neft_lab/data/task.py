"""A task = prompt template + target language + metrics + data sources, read from `conf/task/*.yaml`.

Kinds: `translation` and `summarization` (a source text → a reference target, `prompt` holds `{source}`) and
`instruction` (Alpaca-style instruction/input/output records; `prompt` / `prompt_with_input` hold
`{instruction}` and `{input}`, or the tokenizer's chat template renders the turn), whose test split may be
IFEval rows scored by the `ifeval` metric (no reference outputs).
"""

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
KNOWN_METRICS = {"bleu", "chrf", "rouge", "comet", "ifeval"}
REFERENCE_METRICS = {"bleu", "chrf", "rouge", "comet"}  # they compare predictions with reference outputs
INSTRUCTION = "instruction"
INSTRUCTION_FILES = ("train_file", "val_file", "test_file")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "translation", "summarization" or "instruction"
    source_lang: str
    target_lang: str
    prompt: str  # format string with {source}; instruction: with {instruction} (records without an input)
    metrics: tuple[str, ...]
    target_prefix: str = " "
    stop: tuple[str, ...] = ("\n",)
    max_prompt_tokens: int = 256
    max_target_tokens: int = 128
    max_new_tokens: int = 128
    # a batch generates at most ratio x its longest source (in tokens) + 16 new tokens (None: max_new_tokens only)
    max_new_tokens_ratio: float | None = None
    truncate_source: bool = False
    # case-insensitive BLEU (`sacrebleu --lowercase`), as the paper's authors scored
    bleu_lowercase: bool = False
    data: dict[str, Any] = field(default_factory=dict, compare=False)
    # instruction: the plain template of records that have an input, with {instruction} and {input}
    prompt_with_input: str = ""

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
        if raw.get("kind") == INSTRUCTION:
            _check_instruction(raw, metrics)
        elif "{source}" not in raw.get("prompt", ""):
            raise ConfigError(
                f"task {raw.get('name')}: task.prompt must contain '{{source}}' where the input goes"
            )
        elif "ifeval" in metrics:
            raise ConfigError(
                f"task {raw.get('name')}: the ifeval metric scores instruction tasks only (task.kind=instruction "
                "with IFEval test rows, e.g. task=alpaca_ifeval)"
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
            max_new_tokens_ratio=_ratio(raw, "max_new_tokens_ratio"),
            truncate_source=bool(raw.get("truncate_source", False)),
            bleu_lowercase=_flag(raw, "bleu_lowercase"),
            data=dict(raw.get("data") or {}),
            prompt_with_input=raw.get("prompt_with_input") or "",
        )

    @property
    def ifeval_test(self) -> bool:
        """Whether the test split is IFEval rows (a prompt and instruction ids, no reference output)."""
        return self.kind == INSTRUCTION and bool(self.data.get("test_prompt_field"))

    def check_folders(self) -> None:
        """The local folders (instruction tasks: files) this task would read exist (checked before any model
        or data is loaded)."""
        if self.kind == INSTRUCTION:
            self._instruction_files()
            return
        if self.data.get("source", "auto") in ("embedded", "hub"):
            return
        for key in ("data_dir", "train_dir", "val_dir", "test_dir"):
            if self.data.get(key):
                sources.data_folder(self.data[key], f"task.data.{key}")

    def format_prompt(self, source: str) -> str:
        return self.prompt.format(source=source)

    def render_instruction(self, instruction: str, input: str = "", with_input: bool | None = None) -> str:
        """The plain (no chat template) prompt of an instruction record: Stanford Alpaca's two templates,
        the one with an input section when the record has a non-empty input (or `with_input` says so)."""
        if bool(input) if with_input is None else with_input:
            return self.prompt_with_input.format(instruction=instruction, input=input)
        return self.prompt.format(instruction=instruction)

    def load_splits(self, seed: int = 0) -> dict[str, list[Example]]:
        """Train, validation and test examples, with the size limits of `task.data` applied."""
        data = self.data
        splits = self._load_instruction() if self.kind == INSTRUCTION else self._load_source()
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

    def _load_source(self) -> dict[str, list[Example]]:
        """Translation/summarization splits from `task.data.source`: local files, the hub or the embedded grammar."""
        data = self.data
        kind = data.get("source", "auto")
        if kind == "auto":
            has_local = any(data.get(k) for k in ("data_dir", "train_dir", "test_dir"))
            kind = "local" if has_local else ("hub" if (data.get("hub") or {}).get("path") else None)
        if kind == "embedded":
            emb = data.get("embedded") or {}
            return embedded_splits(
                int(emb.get("n_train", 2000)),
                int(emb.get("n_val", 100)),
                int(emb.get("n_test", 100)),
                int(emb.get("seed", 0)),
            )
        if kind == "local":
            return self._load_local()
        if kind == "hub":
            return self._load_hub()
        raise ConfigError(
            f"task {self.name} has no data source. Point it at local files, e.g. "
            f"task.data.train_dir=/path/with/train.{self.source_lang}+train.{self.target_lang} "
            f"task.data.test_dir=/path/with/test.{self.source_lang}+test.{self.target_lang} "
            "(or task.data.data_dir=... for one folder holding every split), or set task.data.hub.path."
        )

    def _instruction_files(self) -> dict[str, Path | None]:
        """The instruction task's train/validation/test files, checked to exist (validation: optional)."""
        data = self.data
        if data.get("source", "local") not in ("local", "auto"):
            raise ConfigError(
                f"task {self.name}: instruction tasks read local files only (task.data.source=local), "
                f"not task.data.source={data.get('source')}"
            )
        files: dict[str, Path | None] = {}
        for split, key in zip(SPLITS, INSTRUCTION_FILES):
            path = data.get(key)
            ifeval_rows = split == "test" and self.ifeval_test
            what = (
                "IFEval rows (prompt, instruction_id_list, kwargs)"
                if ifeval_rows
                else "instruction/input/output records"
            )
            if not path:
                if split == "validation":
                    files[split] = None
                    continue
                raise ConfigError(
                    f"task {self.name}: no {split} data: set task.data.{key}=/path/to/{split}.jsonl "
                    f"(a JSONL file of {what})"
                )
            files[split] = sources.data_file(path, f"task.data.{key}", what)
        return files

    def _load_instruction(self) -> dict[str, list[Example]]:
        data = self.data
        fields = (
            data.get("instruction_field") or "instruction",
            data.get("input_field"),
            data.get("output_field") or "output",
        )
        splits: dict[str, list[Example]] = {}
        for split, path in self._instruction_files().items():
            if path is None:
                splits[split] = []
            elif split == "test" and self.ifeval_test:
                splits[split] = sources.read_ifeval_file(path, str(data["test_prompt_field"]))
            else:
                splits[split] = sources.read_instruction_file(path, *fields)
        if self.ifeval_test and "ifeval" in self.metrics:  # unknown ids fail now, not after training
            from neft_lab.evaluation.ifeval import check_instruction_ids

            check_instruction_ids(splits["test"])
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


def _check_instruction(raw: dict[str, Any], metrics: tuple[str, ...]) -> None:
    """An instruction task's templates hold their placeholders, and its metrics fit its test rows."""
    name = raw.get("name")
    for key, needed in (("prompt", ("instruction",)), ("prompt_with_input", ("instruction", "input"))):
        template = raw.get(key) or ""
        missing = [f"{{{n}}}" for n in needed if f"{{{n}}}" not in template]
        if missing:
            raise ConfigError(f"task {name}: task.{key} must contain {' and '.join(missing)}: {template!r}")
        try:
            template.format(instruction="", input="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"task {name}: task.{key} is not a valid template ({type(err).__name__}: {err}); "
                "only {instruction} and {input} are filled in, write literal braces as {{ and }}"
            ) from None
    data = raw.get("data") or {}
    if data.get("test_prompt_field"):
        needs_reference = sorted(set(metrics) & REFERENCE_METRICS)
        if needs_reference:
            raise ConfigError(
                f"task {name}: task.metrics={list(metrics)}: {', '.join(needs_reference)} compare with reference "
                f"outputs, which IFEval test rows (task.data.test_prompt_field={data['test_prompt_field']}) do "
                "not have; use task.metrics=[ifeval], or task.data.test_prompt_field=null for a test file of "
                "instruction/input/output records"
            )
    elif "ifeval" in metrics:
        raise ConfigError(
            f"task {name}: the ifeval metric scores IFEval test rows: set task.data.test_prompt_field=prompt "
            "(the prompt's field in IFEval's input_data.jsonl)"
        )


def _tokens(raw: dict[str, Any], key: str) -> int:
    """A token limit: a whole number >= 1."""
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"task.{key}={value!r}: a token limit must be an integer >= 1, e.g. task.{key}=256")
    return value


def _ratio(raw: dict[str, Any], key: str) -> float | None:
    """An optional positive number (null: off)."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(
            f"task.{key}={value!r}: a positive number (e.g. task.{key}=2) or null for no such cap"
        )
    return float(value)


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
