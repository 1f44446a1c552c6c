"""A task = prompt template + target language + metrics + data sources, read from `conf/task/*.yaml`.

Kinds: `translation` and `summarization` (a source text → a reference target, `prompt` holds `{source}`) and
`instruction` (Alpaca-style instruction/input/output records; `prompt` / `prompt_with_input` hold
`{instruction}` and `{input}`, or the tokenizer's chat template renders the turn), whose test split may be
IFEval rows scored by the `ifeval` metric (no reference outputs).

`prompt_style` picks how a translation/summarization pair becomes tokens: `neft_lab` (the task's template,
BOS before the prompt, EOS after the target) or the paper authors' (`authors`: `authors_prompt`, by default
their "Translate the following text from English to Chinese." + " " + source, with no BOS or EOS around the
training pair; `authors_inst`: the same inside their LoRA script's `[INST]...[/INST]`; docs/fidelity.md).
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
PROMPT_STYLES = ("neft_lab", "authors", "authors_inst")
NEWLINES = ("cut", "strip")
# the language names of the authors' instructions (their scripts: "Translate the following text from English to
# Chinese.", "Given the below English article, generate a summary in Chinese.")
LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "de": "German", "fr": "French", "hi": "Hindi", "cs": "Czech",
    "pt": "Portuguese", "ru": "Russian", "ja": "Japanese", "es": "Spanish", "it": "Italian", "bs": "Bosnian",
    "mi": "Maori", "ko": "Korean", "ar": "Arabic", "tr": "Turkish", "uk": "Ukrainian", "pl": "Polish",
}  # fmt: skip


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
    # neft_lab | authors | authors_inst (the module docstring); authors_prompt: their template, with {source}
    prompt_style: str = "neft_lab"
    authors_prompt: str = ""
    # greedy decoding: ban repeated n-grams of this length (the authors: 4; 0: off)
    no_repeat_ngram_size: int = 0
    # cut: keep what precedes the first newline (a newline ends generation) | strip: delete every newline of
    # the output, as the authors' infer.py (.replace('\n', '')); generation then runs to EOS or max_new_tokens
    newlines: str = "cut"

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
        prompt_style = _choice(raw, "prompt_style", PROMPT_STYLES, "neft_lab")
        newlines = _choice(raw, "newlines", NEWLINES, "cut")
        authors_prompt = (
            _authors_prompt(raw) if prompt_style != "neft_lab" else (raw.get("authors_prompt") or "")
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
        if raw.get("kind") != INSTRUCTION:
            _check_template(raw, "prompt", ("source",))
        _check_limits(raw)
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
            prompt_style=prompt_style,
            authors_prompt=authors_prompt,
            no_repeat_ngram_size=_count(raw, "no_repeat_ngram_size"),
            newlines=newlines,
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
        if self.prompt_style == "neft_lab":
            return self.prompt.format(source=source)
        text = self.authors_prompt.format(source=source)
        return f"[INST]{text}[/INST]" if self.prompt_style == "authors_inst" else text

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


def _check_template(raw: dict[str, Any], key: str, fields: tuple[str, ...]) -> None:
    """A format template fills only `fields`: an unknown field or a stray brace is refused up front, not a
    KeyError/ValueError on the first example after the model has loaded."""
    import string

    template = str(raw.get(key) or "")
    allowed = " and ".join(f"{{{f}}}" for f in fields)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(
            f"task.{key} is not a valid template ({err}): {template!r}; only {allowed} is filled in, "
            "write literal braces as {{ and }}"
        ) from None
    for name in names:
        if name.split(".")[0].split("[")[0] not in fields or name != name.split(".")[0].split("[")[0]:
            raise ConfigError(
                f"task.{key} has an unknown field {{{name}}}: use {allowed} (literal braces as {{{{ and }}}}) "
                f"in {template!r}"
            )


def _check_limits(raw: dict[str, Any]) -> None:
    """task.data.max_train/max_val/max_test: null (all) or a whole number >= 1 (-5 used to drop 5 examples)."""
    data = raw.get("data") or {}
    for key in ("max_train", "max_val", "max_test", "val_size"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"task.data.{key}={value!r}: must be an integer >= 1 or null (all examples), "
                f"e.g. task.data.{key}=500"
            )


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = raw.get(key)
    value = default if value is None else value
    if value not in choices:
        raise ConfigError(f"task {raw.get('name')}: task.{key}={value!r}: choose one of {', '.join(choices)}")
    return value


def _count(raw: dict[str, Any], key: str) -> int:
    """A whole number >= 0 (0: off)."""
    value = raw.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"task.{key}={value!r}: a whole number >= 0 (0: off)")
    return value


def _authors_prompt(raw: dict[str, Any]) -> str:
    """The authors' prompt template of a translation/summarization task: `task.authors_prompt`, else their
    instruction for the task's languages + " " + source (translation, infer/infer.py) or + "\nArticle: " +
    source (summarization, train_neuron/data_process.py)."""
    name, kind = raw.get("name"), raw.get("kind")
    if kind == INSTRUCTION:
        raise ConfigError(
            f"task {name}: task.prompt_style={raw.get('prompt_style')} is the authors' translation/summarization "
            "prompt; instruction tasks keep task.prompt_style=neft_lab"
        )
    given = raw.get("authors_prompt")
    if given:
        if "{source}" not in given:
            raise ConfigError(f"task {name}: task.authors_prompt must contain '{{source}}': {given!r}")
        return given
    source, target = (LANGUAGE_NAMES.get(raw.get(k) or "") for k in ("source_lang", "target_lang"))
    if source is None or target is None:
        raise ConfigError(
            f"task {name}: no language name for {raw.get('source_lang')!r} or {raw.get('target_lang')!r} to write "
            "the authors' instruction with: set task.authors_prompt (with {source}), e.g. "
            "task.authors_prompt='Translate the following text from X to Y. {source}'"
        )
    if kind == "summarization":
        return f"Given the below {source} article, generate a summary in {target}.\nArticle: {{source}}"
    return f"Translate the following text from {source} to {target}. {{source}}"


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
