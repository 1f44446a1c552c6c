"""The unit of data every task reduces to: a source text, a target text and where it came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    source: str
    target: str
    origin: str = ""  # "file:line" or "dataset[split][i]", quoted in error messages
