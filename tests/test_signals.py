"""Signals and kills at awkward moments — mid-step, mid-validation, after training, between sweep jobs — and what
must hold after them: the resumed run equals an uninterrupted one (weights, `metrics.json`, the CSV log), the
process says how to resume, and no worker outlives its launcher. (issue 19, B4, B6, B9, B14)"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from hydra.experimental.callback import Callback

from conftest import REPO, free_port, read_metrics, run_in_process, same_exported_weights
from neft_lab.training.checkpoints import load_checkpoint

STEPS = [
    "experiment=smoke",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=24",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "eval.after=false",
    "eval.before=false",
    "task.data.embedded.n_train=96",
    "optim.weight_decay=0.1",
]


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
            "NEFT_LAB_ROOT": str(REPO), "MASTER_PORT": str(free_port())}  # fmt: skip


def _cli(tmp_path: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*STEPS, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", *extra]
    return subprocess.run([sys.executable, "-m", "neft_lab", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _in_process(tmp_path: Path, run_dir: Path, *extra: str) -> None:
    run_in_process(STEPS, tmp_path, run_dir, *extra)


def _csv_log(run_dir: Path) -> dict[tuple[int, str], str]:
    """(step, key) → value of the training log, the last row of a step winning (a resumed attempt logs the
    steps after its checkpoint again, below the killed attempt's rows: tracking.AppendingCSVLogger)."""
    out = {}
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key in ("train/loss", "val/loss", "lr-AdamW/pg1"):
                if row.get(key):
                    out[(int(row["step"]), key)] = row[key]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("whole")
    _in_process(tmp, tmp / "run")
    return tmp / "run"


class SignalAt(L.Callback):
    """Sends `signum` to its own process at `step`, from the hook `where`: `batch_end` (a step boundary),
    `before_optimizer` (mid-step: after the backward pass, before the update) or `validation` (mid-validation)."""

    def __init__(self, step: int, signum: str, where: str = "batch_end") -> None:
        self.step, self.signum, self.where, self.sent = step, getattr(signal, signum), where, False

    def _send(self, trainer, where: str) -> None:
        if where == self.where and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
            time.sleep(0.5)  # a handled signal is acted on at the next step boundary; SIGKILL never returns

    def on_train_batch_end(self, trainer, *args, **kwargs):
        self._send(trainer, "batch_end")

    def on_before_optimizer_step(self, trainer, *args, **kwargs):
        self._send(trainer, "before_optimizer")

    def on_validation_batch_end(self, trainer, *args, **kwargs):
        if not trainer.sanity_checking:
            self._send(trainer, "validation")


def _signal(step: int, signum: str, where: str) -> list[str]:
    return ["+callbacks.kill._target_=test_signals.SignalAt", f"+callbacks.kill.step={step}",
            f"+callbacks.kill.signum={signum}", f"+callbacks.kill.where={where}"]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# B4, B9: stopped mid-step or mid-validation, resumed: the same weights and the same training log


@pytest.mark.fault
@pytest.mark.parametrize(
    ("signum", "step", "where", "stopped_at"),
    [
        ("SIGINT", 12, "before_optimizer", 13),  # Ctrl-C mid-step: the step ends, then it stops
        ("SIGTERM", 10, "batch_end", 10),  # at a validation step: the validation runs first
        ("SIGTERM", 17, "before_optimizer", 18),  # the step that ends an epoch (6 batches each)
        ("SIGUSR1", 15, "validation", 15),  # mid-validation: the validation ends first
        ("SIGKILL", 15, "validation", 10),  # killed mid-validation: last.ckpt of step 15 waits for its end
    ],
)
def test_a_signal_mid_step_or_validation_resumes_bit_equal_with_the_same_log(
    tmp_path, uninterrupted, signum, step, where, stopped_at
):
    run_dir = tmp_path / "run"
    killed = _cli(tmp_path, run_dir, *_signal(step, signum, where))
    assert killed.returncode == {"SIGINT": 130, "SIGKILL": -9}.get(signum, 143), killed.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == stopped_at
    if signum != "SIGKILL":
        assert f"resume={run_dir}" in killed.stderr + killed.stdout
        assert "Traceback" not in killed.stderr
    resumed = _cli(tmp_path, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_exported_weights(uninterrupted, run_dir)
    assert _csv_log(run_dir) == _csv_log(uninterrupted)
    assert read_metrics(run_dir)["train"]["best_checkpoint"].endswith(
        Path(read_metrics(uninterrupted)["train"]["best_checkpoint"]).name
    )


# ------------------------------------------------------------------------------------------------
# B9: metrics of a run killed after training; the CSV of a run started over


@pytest.mark.fault
def test_a_run_killed_while_writing_its_metrics_reports_its_training_on_rerun(tmp_path, monkeypatch):
    """20 steps, a checkpoint every 5: last.ckpt is of the last step, so the rerun has nothing left to train."""
    import neft_lab.stages.fit as fit_stage

    run_dir, twenty = tmp_path / "run", "trainer.max_steps=20"

    def killed(path, data):
        raise KeyboardInterrupt("killed while writing metrics.json")

    with monkeypatch.context() as patch:
        patch.setattr(fit_stage, "atomic_write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            _in_process(tmp_path, run_dir, twenty)
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 20
    _in_process(tmp_path, run_dir, twenty)
    train, log = read_metrics(run_dir)["train"], _csv_log(run_dir)
    assert train["steps"] == 20
    assert train["final_loss"] == pytest.approx(float(log[(19, "train/loss")]))
    assert train["best_val_loss"] == pytest.approx(
        min(float(v) for (_, k), v in log.items() if k == "val/loss")
    )
    for key in ("step_seconds_median", "tokens_per_second_median"):
        assert isinstance(train[key], float) and train[key] > 0, key


@pytest.mark.fault
def test_starting_over_in_a_finished_folder_drops_the_old_training_log(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    _in_process(tmp_path, run_dir, "trainer.max_steps=12", "trainer.log_every_n_steps=1")
    _in_process(tmp_path, run_dir, "resume=false")
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps == sorted(set(steps)), "rows of the earlier run are still in the log"
    assert _csv_log(run_dir) == _csv_log(uninterrupted)


# ------------------------------------------------------------------------------------------------
# B14: SIGTERM outside training


def _stop_when(proc: subprocess.Popen, marker: str, signum: int = signal.SIGTERM) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(signum)
            break
    try:
        seen.append(proc.communicate(timeout=120)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(seen)


class SlowEvaluation(L.Callback):
    """Makes the after-training test evaluation slow enough to be stopped in (prints a marker when it starts)."""

    def on_train_end(self, trainer, pl_module):
        import neft_lab.evaluation.evaluate as evaluation

        evaluate = evaluation.evaluate

        def slow(*args, **kwargs):
            print("EVALUATION STARTS", flush=True)
            time.sleep(30)
            return evaluate(*args, **kwargs)

        evaluation.evaluate = slow


@pytest.mark.fault
def test_sigterm_during_the_evaluation_after_training_exits_143_with_the_resume_hint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*STEPS, "trainer.max_steps=6", "eval.after=true", "+callbacks.slow._target_=test_signals.SlowEvaluation",
            f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "neft_lab", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = _stop_when(proc, "EVALUATION STARTS")
    assert proc.returncode == 143, output[-3000:]
    assert f"resume={run_dir}" in output and "Traceback" not in output
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.fault
def test_sigterm_between_the_jobs_of_a_sweep_exits_143_with_a_hint(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *STEPS, "trainer.max_steps=2", "seed=0,1", f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path / 'cache'}", "+hydra.callbacks.pause._target_=test_signals.PauseBetweenJobs"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "neft_lab", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = _stop_when(proc, "JOB DONE")
    assert proc.returncode == 143, output[-3000:]
    assert "rerun the same command" in output and "Traceback" not in output


class PauseBetweenJobs(Callback):
    """A Hydra callback: after each job of a sweep (its run finished), print a marker and pause, so that the
    test stops the process between two jobs."""

    def on_job_end(self, config, job_return, **kwargs):
        print("JOB DONE", flush=True)
        time.sleep(30)


# ------------------------------------------------------------------------------------------------
# B6: the workers of a parallel sweep exit with their launcher


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.fault
def test_the_workers_of_a_killed_parallel_sweep_exit_with_it(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    args = ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *STEPS, "trainer.max_steps=400",
            "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    launcher = subprocess.Popen([sys.executable, "-m", "neft_lab", *args], cwd=tmp_path, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both jobs have started training
            logs = list((tmp_path / "sweep").rglob("csv/metrics.csv"))
            if len(logs) == 2 and all(p.stat().st_size > 0 for p in logs):
                break
            time.sleep(0.5)
        workers = [p for p in _children(launcher.pid) if _alive(p)]
        assert workers, "no worker processes found"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.5)
        assert not any(_alive(p) for p in workers), "workers outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in workers:  # this test's own processes only
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
