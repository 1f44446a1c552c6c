"""Faults a cluster throws at a run — kills, preemption, full disks, moved folders, hostile checkpoints —
and what must survive them: no run lost (resume ends bit-equal to an uninterrupted run), no artifact
corrupted. `python -m pytest -m "fault or bad_input" tests` prints the suite's figures (conftest.py)."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, exported_weights, read_metrics, run_cli, run_in_process, same_exported_weights
from neft_lab.errors import ConfigError
from neft_lab.training.checkpoints import AtomicCheckpointIO, load_checkpoint

STEPS = [
    "experiment=smoke",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=24",
    "trainer.val_check_interval=5",
    "eval.after=false",
    "eval.before=false",
    "task.data.embedded.n_train=96",
    "optim.weight_decay=0.1",
]


def _in_process(tmp_path: Path, run_dir: Path, *extra: str) -> None:
    run_in_process(STEPS, tmp_path, run_dir, *extra)


def _cli(tmp_path: Path, run_dir: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [*STEPS, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", *extra]
    return run_cli(args, cwd=tmp_path, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the same 24-step full fine-tune, never interrupted."""
    tmp = tmp_path_factory.mktemp("whole")
    _in_process(tmp, tmp / "run")
    return tmp / "run"


class SignalAtStep(L.Callback):
    """Sends `signum` to its own process once training reaches `step` (as a scheduler or a user would)."""

    def __init__(self, step: int, signum: str) -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            time.sleep(0.5)  # SIGKILL never returns; the handled signals are acted on at the next step


# ------------------------------------------------------------------------------------------------
# kills and preemption


@pytest.mark.fault
@pytest.mark.parametrize(
    ("signum", "step"), [("SIGTERM", 7), ("SIGUSR1", 16), ("SIGINT", 12), ("SIGKILL", 13)]
)
def test_killed_run_resumes_bit_equal(tmp_path, uninterrupted, monkeypatch, signum, step):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    )
    run_dir = tmp_path / "run"
    killed = _cli(tmp_path, run_dir, "+callbacks.kill._target_=test_faults.SignalAtStep", f"+callbacks.kill.step={step}",
                  f"+callbacks.kill.signum={signum}")  # fmt: skip
    assert killed.returncode != 0, "a stopped job must not look finished"
    assert not (run_dir / "metrics.json").exists()
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if signum in ("SIGTERM", "SIGUSR1"):
        assert killed.returncode == 143
        assert last["global_step"] == step  # saved where it stopped: nothing is redone
        assert f"resume={run_dir}" in killed.stderr + killed.stdout
    elif signum == "SIGINT":
        assert last["global_step"] == step
    else:  # SIGKILL cannot be caught: the last interval checkpoint is intact
        assert killed.returncode == -signal.SIGKILL and last["global_step"] == 10
    resumed = _cli(tmp_path, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_exported_weights(uninterrupted, run_dir)


@pytest.mark.fault
def test_sigterm_during_the_reference_run_exits_non_zero(tmp_path):
    """Preempted while NeFT's reference fine-tune runs inside the job: non-zero, no metrics, no scores."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    args = [*STEPS, "strategy=neft", "selection.reference.steps=400", f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "neft_lab", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "reference run: full fine-tuning" in line:
            time.sleep(3)  # well inside its 400 steps
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=120) == 143, output[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not list((tmp_path / "cache").rglob("scores.safetensors"))


# ------------------------------------------------------------------------------------------------
# checkpoint writes


@pytest.mark.fault
def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, target)

    def torn_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, target)
    monkeypatch.undo()
    assert load_checkpoint(target)["global_step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.fault
def test_full_disk_while_saving_keeps_a_resumable_run(tmp_path, uninterrupted):
    """The run folder on a small tmpfs that fills up during a checkpoint save: room for two checkpoints
    (last.ckpt is a hard link of the best one), not the third that save_top_k=2 writes before dropping one."""
    mount = tmp_path / "small"
    mount.mkdir()
    size = (uninterrupted / "checkpoints" / "last.ckpt").stat().st_size
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size * 2.5)}", "tmpfs", str(mount)]
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_dir = mount / "run"
        with pytest.raises(
            (OSError, RuntimeError)
        ):  # best + last at 5, last at 10 ... until the disk is full
            _in_process(tmp_path, run_dir, "callbacks.model_checkpoint.save_top_k=2")
        saved = {p.name: load_checkpoint(p)["global_step"] for p in (run_dir / "checkpoints").glob("*.ckpt")}
        assert saved, "nothing was checkpointed before the disk filled"  # every checkpoint left loads
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))
        moved = tmp_path / "roomy"
        shutil.copytree(run_dir, moved)  # the user frees space (here: moves the folder), then resumes
    finally:
        subprocess.run(["umount", str(mount)])
    _in_process(tmp_path, moved, "callbacks.model_checkpoint.save_top_k=2")
    assert same_exported_weights(uninterrupted, moved)


@pytest.mark.fault
def test_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")  # what root cannot be denied by permissions
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot write checkpoints"):
        _in_process(tmp_path, run_dir)
    assert time.perf_counter() - started < 30 and not (run_dir / "metrics.json").exists()


@pytest.mark.fault
def test_last_checkpoint_is_written_on_schedule_not_only_on_improvement(tmp_path, monkeypatch):
    """`mode=max` on a falling loss: the best is saved once, yet last.ckpt follows every validation."""
    run_dir = tmp_path / "run"
    crash = ["+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=13",
             "callbacks.model_checkpoint.mode=max"]  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process(tmp_path, run_dir, *crash)
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 10


# ------------------------------------------------------------------------------------------------
# reruns, moved folders, corrupted and hostile checkpoints


@pytest.mark.fault
def test_rerunning_a_finished_run_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    _in_process(tmp_path, run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    _in_process(tmp_path, run_dir)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.fault
def test_a_different_config_in_an_existing_run_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process(
            tmp_path, run_dir, "+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=13"
        )
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 → 0\.01"):
        _in_process(tmp_path, run_dir, "optim.lr=0.01")
    assert (run_dir / "config.yaml").read_text() == saved  # the folder still describes what it holds
    _in_process(tmp_path, run_dir, "optim.lr=0.01", "resume=false")  # starting over is explicit
    assert read_metrics(run_dir)["train"]["steps"] == 24


@pytest.mark.fault
def test_a_moved_run_folder_restores_its_own_best_checkpoint(tmp_path):
    """`mode=max` on a falling loss: the best is the first validation's, saved before the move and never
    replaced after it, so only the path recorded inside last.ckpt can find it."""
    first, keep_first_best = tmp_path / "first", "callbacks.model_checkpoint.mode=max"
    crash = ["+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=13", keep_first_best]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process(tmp_path, first, *crash)
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    _in_process(tmp_path, moved, keep_first_best)
    best = Path(read_metrics(moved)["train"]["best_checkpoint"])
    assert best.parent == moved / "checkpoints" and best.name.startswith("step000005")
    exported, saved = exported_weights(moved), load_checkpoint(best)["state_dict"]
    assert all(torch.equal(exported[k.removeprefix("model.")], v) for k, v in saved.items())


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupted_last_checkpoint_falls_back_to_the_previous_good_one(
    tmp_path, uninterrupted, damage, caplog
):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process(
            tmp_path, run_dir, "+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=13"
        )
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    # a broken file lands at the name, as a copy or move that broke off leaves it (a new file: last.ckpt may be
    # a second name of the best checkpoint of its step, which keeps its own good copy; AtomicCheckpointIO)
    broken = last.with_name("broken")
    broken.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    )
    broken.replace(last)
    _in_process(tmp_path, run_dir)
    assert "last.ckpt is truncated or corrupted: resuming from" in caplog.text
    assert same_exported_weights(uninterrupted, run_dir)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.fault
def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _in_process(tmp_path, run_dir)
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    with zipfile.ZipFile(hostile, "w") as archive:  # torch's zip layout with a pickle that calls os.system
        archive.writestr("hostile/data.pkl", pickle.dumps({"state_dict": _Payload(marker)}, protocol=2))
        archive.writestr("hostile/version", "3\n")
    done = run_cli(
        ["stage=eval", f"ckpt={hostile}", "model=tiny", "strategy=full", "logger=none"], cwd=tmp_path
    )
    assert not marker.exists(), "loading a checkpoint ran code"
    assert done.returncode == 2 and "cannot be read safely" in done.stderr and "Traceback" not in done.stderr
