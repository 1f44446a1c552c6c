"""Shared fixtures: tiny models, a config composer, the CLI, and the location of ../shared/data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from neft_lab.config import compose

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEFT_LAB_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(1)  # tiny models: threads only add contention

# Tests never write into the user's cache (~/.cache/neft_lab or their $NEFT_LAB_CACHE): for the whole session
# NEFT_LAB_CACHE (hence `paths.cache_dir`, the Gemma folder and every `run_cli` subprocess) points at a
# temporary folder, set here at import time so configs composed anywhere in the session see it. The
# exception is the `slow` tests (tests/test_gemma_gguf.py, tests/test_quickstart.py): they need the real
# Gemma-3-270M converted once into the user's cache, so `_user_cache_for_slow_tests` gives it back to them.
# HF_HOME is left alone: no test downloads from the Hugging Face hub.
USER_CACHE = os.environ.get("NEFT_LAB_CACHE")
TEST_CACHE = Path(tempfile.mkdtemp(prefix="neft_lab-test-cache-"))
os.environ["NEFT_LAB_CACHE"] = str(TEST_CACHE)


def pytest_unconfigure(config):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _user_cache_for_slow_tests(request, monkeypatch):
    """`slow` tests load the real Gemma-3-270M from the user's cache (converting it there once)."""
    if "slow" in request.keywords:
        if USER_CACHE is None:
            monkeypatch.delenv("NEFT_LAB_CACHE", raising=False)
        else:
            monkeypatch.setenv("NEFT_LAB_CACHE", USER_CACHE)
    yield


def pytest_collection_modifyitems(config, items):
    skip_data = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA} (set NEFT_LAB_SHARED_DATA)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_data)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The reliability figures (README, "Reliability"): bad inputs tried and faults injected, and how many
    were handled. A failing `fault` case is a lost run or a corrupted artifact."""
    counts = {(kind, ok): 0 for kind in ("bad_input", "fault") for ok in (True, False)}
    for status in ("passed", "failed", "error"):  # skipped cases were not tried
        for report in terminalreporter.stats.get(status, []):
            if getattr(report, "when", None) != "call" and status not in ("error", "failed"):
                continue
            for kind in ("bad_input", "fault"):
                if kind in getattr(report, "keywords", {}):
                    counts[(kind, status == "passed")] += 1
    if not any(counts.values()):
        return
    bad_ok, bad_failed = counts[("bad_input", True)], counts[("bad_input", False)]
    fault_ok, fault_failed = counts[("fault", True)], counts[("fault", False)]
    terminalreporter.write_line(
        f"reliability: {bad_ok + bad_failed} bad inputs tried, {bad_ok} refused with a one-line error; "
        f"{fault_ok + fault_failed} faults injected, {fault_ok} recovered; "
        f"runs lost or artifacts corrupted: {fault_failed}; bad inputs not refused cleanly: {bad_failed}"
    )


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


_PORT_LOCK = threading.Lock()
_NEXT_PORT = [29600 + (os.getpid() % 2000) * 8]


def free_port() -> int:
    """A distinct free port for each job this test session starts. Lightning's own choice (bind to port 0,
    close, hand the number to the ranks) can give two jobs started together the same port, and their
    ranks then meet the wrong rank 0 and wait forever."""
    with _PORT_LOCK:
        while True:
            port = _NEXT_PORT[0]
            _NEXT_PORT[0] += 1
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m neft_lab ARGS` in a fresh process, as a user would type it (a port of its own for DDP)."""
    env = {**os.environ, "WANDB_MODE": "offline", "NEFT_LAB_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    env["MASTER_PORT"] = str(free_port())
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


def run_in_process(steps: list[str], tmp_path: Path, run_dir: Path, *extra: str) -> None:
    """One run of `steps` (+ `extra`) in this process, in `run_dir`, with a cache of its own under `tmp_path`."""
    from neft_lab.config import compose
    from neft_lab.pipeline import run

    run(compose([*steps, f"paths.run_dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", *extra]))


def exported_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


def same_exported_weights(a: Path, b: Path) -> bool:
    """Whether two runs exported bit-identical weights (a resumed run against the uninterrupted one)."""
    import torch

    wa, wb = exported_weights(a), exported_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class CrashAtStep:
    """A Lightning callback that kills training at a given step (for resume tests): `+callbacks.crash._target_=conftest.CrashAtStep`."""

    def __new__(cls, step: int):
        import lightning as L

        class _Crash(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                if trainer.global_step >= step:
                    raise RuntimeError(f"simulated crash at step {step}")

        return _Crash()
