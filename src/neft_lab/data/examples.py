"""The unit of data every task reduces to: a source text, a target text and where it came from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    source: str
    target: str
    origin: str = ""  # "file:line" or "dataset[split][i]", quoted in error messages
    # What a task kind needs beyond source/target, kept out of equality and hashing: an instruction record's
    # separate instruction and input (the plain template places them apart), an IFEval row's key,
    # instruction ids and their arguments (what the IFEval checks read).
    meta: Mapping[str, Any] | None = field(default=None, compare=False)
