"""Shared fixtures: tiny models, a config composer, the CLI, and the location of ../shared/data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neft_lab.config import compose

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEFT_LAB_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(1)  # tiny models: threads only add contention


def pytest_collection_modifyitems(config, items):
    skip_data = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA} (set NEFT_LAB_SHARED_DATA)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_data)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long in-process run of the tiny model on the embedded task."""
    return [
        "experiment=smoke",
        "logger=none",
        "resume=false",  # tests reuse one run folder for several runs; each must start afresh
        f"paths.run_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.enable_progress_bar=false",
    ]


@pytest.fixture
def compose_cfg():
    return compose


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m neft_lab ARGS` in a fresh process, as a user would type it."""
    env = {**os.environ, "WANDB_MODE": "offline", "NEFT_LAB_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "neft_lab", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


class CrashAtStep:
    """A Lightning callback that kills training at a given step (for resume tests): `+callbacks.crash._target_=conftest.CrashAtStep`."""

    def __new__(cls, step: int):
        import lightning as L

        class _Crash(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                if trainer.global_step >= step:
                    raise RuntimeError(f"simulated crash at step {step}")

        return _Crash()
