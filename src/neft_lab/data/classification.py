"""Labelled texts for a classification task (the paper's probe studies XNLI): JSON lines, one example a line.

A record holds the text (`text_field`, default "text") and its label (`label_field`, default "label"): an
integer class, or a name listed in `label_names` (its index there is the class). `template` (a Python format
string over the record's fields) builds the text from several fields instead, e.g. the authors' XNLI prompt
``sentence1:"{premise}"\\nsentence2:"{hypothesis}"\\nWhat is the relationship between these two sentences?``.
The data are the user's to supply; every mistake is a `DataError` that names the file, the line and the setting
that fixes it (`key` is that setting's prefix, e.g. ``selection.probe.file``).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neft_lab.data.sources import data_file, read_records, text_at, value_at
from neft_lab.errors import DataError

WHAT = (
    'JSON lines of {"text": ..., "label": <int>} (e.g. XNLI: label 0 entailment, 1 neutral, 2 contradiction)'
)


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[int]
    classes: tuple[int, ...]  # the distinct labels, sorted


def read_labelled_texts(
    path: str | Path,
    *,
    key: str,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    template: str | None = None,
    max_examples: int | None = None,
) -> LabelledTexts:
    """The first `max_examples` (None: all) labelled texts of a JSONL file; at least two classes among them."""
    prefix = key.rsplit(".", 1)[0]  # "selection.probe.file" → "selection.probe"
    file = data_file(path, key, WHAT)
    names = [str(n) for n in label_names] if label_names else None
    fields = [f for _, f, _, _ in string.Formatter().parse(template)] if template else []
    texts: list[str] = []
    labels: list[int] = []
    for record, where in read_records(file):
        if max_examples is not None and len(texts) >= max_examples:
            break
        if template:
            for name in filter(None, fields):
                value_at(
                    record, name, where, f"The {prefix}.template={template!r} needs it: fix the template."
                )
            text = template.format_map(record)
        else:
            text = text_at(
                record, text_field, where, f"Set {prefix}.text_field to the field that holds the text."
            )
        raw = value_at(
            record, label_field, where, f"Set {prefix}.label_field to the field that holds the label."
        )
        labels.append(_label(raw, names, where, prefix))
        texts.append(text)
    classes = tuple(sorted(set(labels)))
    if len(classes) < 2:
        raise DataError(
            f"{file}: every example has the label {classes[0] if classes else None}: a probe needs at least two "
            "classes (give labelled examples of each class, or raise the example limit)"
        )
    return LabelledTexts(texts, labels, classes)


def _label(raw: Any, names: list[str] | None, where: str, prefix: str) -> int:
    if names is not None:
        if str(raw) not in names:
            raise DataError(f"{where}: label {raw!r} is not one of {names} ({prefix}.label_names)")
        return names.index(str(raw))
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise DataError(
            f"{where}: label {raw!r} is not an integer: use integer classes, or list the label names in order "
            f"with {prefix}.label_names (e.g. [entailment, neutral, contradiction])"
        )
    return raw
