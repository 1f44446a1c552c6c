"""The stages of `python -m neft_lab stage=<name>`, registered by name; one module each.

| stage     | module              | what it does                                                         |
|-----------|---------------------|----------------------------------------------------------------------|
| fit       | `stages/fit.py`     | train a strategy, export it, evaluate it (in a run folder)           |
| eval      | `stages/eval.py`    | score a saved result on the task's test split (in a run folder)      |
| export    | `stages/export.py`  | a saved result as a merged Hugging Face folder                       |
| report    | `stages/report.py`  | the table, significance and curves of finished runs                  |
| analyze   | `stages/analyze.py` | the paper's §6 analysis of how neurons changed                       |
| reference | `stages/reference.py` | NeFT's short full fine-tune that scores are computed from (cached) |
| score     | `stages/score.py`   | a score for every neuron vector (cached)                             |
| select    | `stages/select.py`  | a neuron set from scores and a budget                                |

Each stage module has `check(cfg)`, the whole config check of that stage (`neft_lab.validation` calls it
before anything is loaded), and `run(cfg, run_dir)`. A stage module imports nothing heavy at module level
(torch, transformers, Lightning are imported inside `run`), so the CLI refuses a bad value in about a second.
`neft_lab.pipeline.run` composes a run: the run folder, its lock, seeding and threads, then the stage.

A new stage is one module with `check` and `run` plus one `register(Stage(...))` line (see `docs/architecture.md`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig

from neft_lab.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """A stage: its name on the command line, the module that runs it, and what the pipeline sets up for it."""

    name: str
    module: str  # `check(cfg)` and `run(cfg, run_dir)`
    run_folder: bool = False  # runs in a run folder of its own: locked, resumable, seeded (fit, eval)
    threads: bool = (
        True  # sets torch's CPU threads first (neft_lab.threads); report and export load no compute
    )
    lightning_logs: bool = (
        True  # Lightning's log lines go through Hydra's log (every stage that loads a model)
    )

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def check(self, cfg: DictConfig) -> None:
        self.load().check(cfg)

    def run(self, cfg: DictConfig, run_dir: Path | None) -> float | None:
        return self.load().run(cfg, run_dir)


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


for _stage in (
    Stage("fit", "neft_lab.stages.fit", run_folder=True),
    Stage("eval", "neft_lab.stages.eval", run_folder=True),
    Stage("export", "neft_lab.stages.export", threads=False),
    Stage("report", "neft_lab.stages.report", threads=False, lightning_logs=False),
    Stage("analyze", "neft_lab.stages.analyze"),
    Stage("reference", "neft_lab.stages.reference"),
    Stage("score", "neft_lab.stages.score"),
    Stage("select", "neft_lab.stages.select"),
):
    register(_stage)

SELECTION_STAGES = ("reference", "score", "select")  # the NeFT selection chain run apart (neft_lab.chain)


def named(name: Any) -> Stage:
    """The stage called `name`, or a one-line error listing the stages."""
    if not isinstance(name, str) or name not in STAGES:
        raise ConfigError(f"stage={name!r}: unknown stage, choose one of {tuple(STAGES)}")
    return STAGES[name]


_DEPTH = [0]  # > 0 while a run is going on in this process: the NeFT reference run is nested in its run


@contextmanager
def running() -> Iterator[int]:
    """Counts the runs under way in this process (yields the depth: 1 for the command's own run)."""
    _DEPTH[0] += 1
    try:
        yield _DEPTH[0]
    finally:
        _DEPTH[0] -= 1


def run_depth() -> int:
    """How many runs are under way in this process: 0 outside any, 2 in the NeFT reference run of a fit."""
    return _DEPTH[0]


def nested_run() -> bool:
    """True inside a run started by another run (the NeFT reference run)."""
    return _DEPTH[0] > 1
