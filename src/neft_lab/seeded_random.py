"""Python's global `random`, seeded for a block and then given back as it was: for third-party code that draws from
the global state (the authors' probe split, lm-eval's IFEval checks) without disturbing the caller's stream."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator


@contextlib.contextmanager
def seeded_random(seed: int | str) -> Iterator[None]:
    """`random.seed(seed)` inside the block; the caller's state restored after it (a str seed hashes the same in
    every process)."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
