"""A diverging run stops before saving, choosing or exporting NaN; JSON is strict; the CSV log survives
resumes and reruns; artifacts get the modes the umask gives."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from neft_lab.config import compose
from neft_lab.errors import ConfigError, NonFiniteLossError
from neft_lab.io import apply_umask, atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text
from neft_lab.pipeline import run
from neft_lab.tracking import AppendingCSVLogger

SHORT = [
    "trainer.max_steps=30",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "eval.before=false",
    "task.data.embedded.n_test=8",
]


class BlowUpAt:
    """From optimizer step `step` on, the learning rate is 1e10: a run that was fine diverges."""

    def __new__(cls, step: int):
        class _BlowUp(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                if trainer.global_step + 1 >= step:  # the update about to be made is step `step`
                    for group in optimizer.param_groups:
                        group["lr"] = 1e10

        return _BlowUp()


class PoisonAt:
    """After optimizer step `step`, one trained weight is NaN (before any checkpoint callback runs)."""

    def __new__(cls, step: int):
        class _Poison(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
                if trainer.global_step == step:
                    with torch.no_grad():
                        next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("nan")

        return _Poison()


class PoisonRankAt:
    """After optimizer step `step`, one trained weight is NaN on global rank `rank` only."""

    def __new__(cls, step: int, rank: int):
        class _Poison(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
                if trainer.global_step == step and trainer.global_rank == rank:
                    with torch.no_grad():
                        next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("nan")

        return _Poison()


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _checkpoints_are_finite(run_dir: Path) -> list[Path]:
    files = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    for file in files:
        assert "nan" not in file.name and "inf" not in file.name, file
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
        for name, tensor in ckpt["state_dict"].items():
            assert torch.isfinite(tensor).all(), f"{file.name}: {name} is not finite"
        for state in ckpt.get("callbacks", {}).values():
            best = state.get("best_model_path") or ""
            assert "nan" not in Path(best).name and "inf" not in Path(best).name, best
            score = state.get("best_model_score")
            assert score is None or math.isfinite(float(score)), state
    return files


def _no_results(run_dir: Path) -> None:
    assert not (run_dir / "export").exists(), "a diverged model was exported"
    assert not (run_dir / "neft_delta.safetensors").exists()
    metrics = run_dir / "metrics.json"
    if metrics.exists():  # never with NaN in it
        _strict_json(metrics.read_text())


# ---- item 6: NaN is neither trained on, chosen nor exported ---------------------------------------------
@pytest.mark.fault
def test_lr_1e10_stops_with_a_clear_error_and_writes_nothing_non_finite(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"diverged at step \d+: the training loss is nan") as err:
        run(compose([*tiny_overrides, *SHORT, "optim.lr=1e10"]))
    message = str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI prints it in one line and exits 2
    assert "\n" not in message
    assert "optim.lr (now 1e+10)" in message and "trainer.gradient_clip_val" in message
    _checkpoints_are_finite(run_dir)
    _no_results(run_dir)


@pytest.mark.fault
def test_divergence_after_a_good_checkpoint_keeps_it_and_never_picks_nan_as_best(tiny_overrides, tmp_path):
    """Steps 1-6 train normally (checkpoints at step 5), then the learning rate explodes."""
    run_dir = tmp_path / "run"
    blow_up = ["+callbacks.blow_up._target_=test_guards.BlowUpAt", "+callbacks.blow_up.step=7"]
    with pytest.raises(NonFiniteLossError, match="diverged at step") as err:
        run(compose([*tiny_overrides, *SHORT, *blow_up]))
    assert "kept: " in str(err.value) and "last.ckpt" in str(err.value)
    files = _checkpoints_are_finite(run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5, "last.ckpt is not the last state before the divergence"
    best = [f.name for f in files if f.name != "last.ckpt"]
    assert len(best) == 1 and best[0].startswith("step000005-"), best
    _no_results(run_dir)


@pytest.mark.fault
def test_non_finite_weights_are_never_checkpointed(tiny_overrides, tmp_path):
    """A weight turns NaN right at a checkpoint step: the checkpoint of step 10 is refused."""
    run_dir = tmp_path / "run"
    poison = ["+callbacks.poison._target_=test_guards.PoisonAt", "+callbacks.poison.step=10"]
    with pytest.raises(NonFiniteLossError, match="diverged at step 10"):
        run(compose([*tiny_overrides, *SHORT, *poison]))
    _checkpoints_are_finite(run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5
    _no_results(run_dir)


@pytest.mark.fault
def test_non_finite_weights_at_the_end_are_not_exported(tiny_overrides, tmp_path):
    """The last update breaks the weights after the last checked loss: no last.ckpt, no export."""
    run_dir = tmp_path / "run"
    poison = ["+callbacks.poison._target_=test_guards.PoisonAt", "+callbacks.poison.step=8"]
    with pytest.raises(NonFiniteLossError, match="holds NaN or infinite values"):
        run(compose([*tiny_overrides, *SHORT, "trainer.max_steps=8", *poison]))
    _checkpoints_are_finite(run_dir)
    _no_results(run_dir)


@pytest.mark.fault
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    old = os.umask(0o022)  # the child inherits it: Hydra's run folder and files must be shared too (item 12)
    try:
        done = run_cli(
            [
                "experiment=smoke",
                "logger=csv",
                "trainer.enable_progress_bar=false",
                *SHORT,
                "optim.lr=1e10",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            cwd=tmp_path,
        )
    finally:
        os.umask(old)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.startswith("neft_lab error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "training diverged at step" in lines[0] and "optim.lr" in lines[0]
    _checkpoints_are_finite(tmp_path / "run")
    _no_results(tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / ".hydra").is_dir()
    assert not _not_shared(tmp_path / "run"), _not_shared(tmp_path / "run")


@pytest.mark.fault
def test_ddp_ranks_stop_together_when_one_rank_diverges(tmp_path, monkeypatch):
    """Rank 1's loss turns NaN, rank 0's does not: both stop with the error (none hangs or crashes)."""
    from conftest import REPO

    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))  # the ranks import test_guards.PoisonRankAt
    done = run_cli(
        [
            "experiment=smoke",
            "logger=none",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.enable_progress_bar=false",
            *SHORT,
            "+callbacks.poison._target_=test_guards.PoisonRankAt",
            "+callbacks.poison.step=7",
            "+callbacks.poison.rank=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert "training diverged at step 8" in done.stderr
    _checkpoints_are_finite(tmp_path / "run")
    _no_results(tmp_path / "run")


# ---- strict JSON -----------------------------------------------------------------------------------------
def test_json_writers_write_strict_json_with_null_for_non_finite(tmp_path):
    data = {
        "loss": float("nan"),
        "best": float("inf"),
        "worst": -math.inf,
        "ok": 0.5,
        "n": 3,
        "flag": True,
        "nested": [np.float32("nan"), np.float64(1.25), (float("-inf"), None)],
        "text": "NaN",
    }
    text = atomic_write_json(tmp_path / "m.json", data).read_text()
    assert _strict_json(text) == {
        "loss": None,
        "best": None,
        "worst": None,
        "ok": 0.5,
        "n": 3,
        "flag": True,
        "nested": [None, 1.25, [None, None]],
        "text": "NaN",
    }
    lines = atomic_write_jsonl(tmp_path / "p.jsonl", [{"a": float("nan")}, {"b": 1.0}]).read_text()
    assert [_strict_json(line) for line in lines.splitlines()] == [{"a": None}, {"b": 1.0}]


# ---- item 7: the CSV log survives resumes and reruns ----------------------------------------------------
def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _contains_in_order(rows: list[dict[str, str]], earlier: list[dict[str, str]]) -> bool:
    """`earlier` is the start of `rows`, compared on the columns `earlier` had (new ones may have come)."""
    head = rows[: len(earlier)]
    return len(head) == len(earlier) and all(
        all(new.get(k, "") == v for k, v in old.items()) for old, new in zip(earlier, head, strict=True)
    )


@pytest.mark.fault
def test_csv_log_is_appended_across_a_resume_and_a_rerun(tmp_path):
    run_dir = tmp_path / "run"
    base = [
        "experiment=smoke",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"paths.run_dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=24",
        "trainer.val_check_interval=5",
        "trainer.log_every_n_steps=1",
        "eval.before=false",
        "eval.after=false",
    ]
    crash = ["+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=13"]
    with pytest.raises(RuntimeError, match="simulated crash at step 13"):
        run(compose([*base, *crash]))
    before_kill = _rows(run_dir)
    losses = [int(r["step"]) for r in before_kill if r.get("train/loss")]
    # Lightning's CSV `step` counts from 0 (optimizer step k is row k-1): steps 1-12 were logged, the
    # crash came in step 13 before its row; the last checkpoint is step 10
    assert losses == list(range(12)), losses

    run(compose(base))  # resume=auto: continues from last.ckpt (step 10)
    resumed = _rows(run_dir)
    assert _contains_in_order(resumed, before_kill), "resuming dropped or changed the earlier rows"
    new = resumed[len(before_kill) :]
    steps = [int(r["step"]) for r in new if r.get("train/loss")]
    assert steps == list(range(10, 24)), steps  # steps 11-24; rows of steps 11-12 are there twice (kept)
    assert any(r.get("val/loss") for r in new)

    run(compose([*base, "resume=false"]))  # starting over: the earlier run's log goes with its results
    rerun = _rows(run_dir)
    assert [int(r["step"]) for r in rerun if r.get("train/loss")] == list(range(24))


def test_appending_csv_logger_widens_the_header_and_repairs_a_cut_row(tmp_path):
    def logger():
        return AppendingCSVLogger(save_dir=tmp_path, name="csv", version="", flush_logs_every_n_steps=1)

    first = logger()
    first.log_metrics({"a": 1.0}, step=0)
    first.log_metrics({"a": 2.0}, step=1)
    first.finalize("success")
    path = tmp_path / "csv" / "metrics.csv"
    with open(path, "ab") as handle:  # a kill in the middle of a row
        handle.write(b"3.0")
    second = logger()
    second.log_metrics({"a": 4.0}, step=2)
    second.log_metrics({"b": 5.0}, step=3)  # a new column
    second.finalize("success")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["a"], r.get("b", "")) for r in rows] == [
        ("0", "1.0", ""),
        ("1", "2.0", ""),
        ("", "3.0", ""),  # the cut row stays (nothing measured is deleted), on its own line
        ("2", "4.0", ""),
        ("3", "", "5.0"),
    ]


# ---- item 12: modes follow the umask ---------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_get_the_modes_of_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == file_mode
        assert _mode(atomic_write_json(tmp_path / "a.json", {"x": 1})) == file_mode
        assert _mode(atomic_write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])) == file_mode
        with atomic_dir(tmp_path / "export") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_text("y")
        export = tmp_path / "export"
        assert _mode(export) == dir_mode and _mode(export / "sub") == dir_mode
        assert _mode(export / "model.safetensors") == file_mode and _mode(export / "sub" / "f") == file_mode
        private = tmp_path / "private"
        save_file({"w": torch.zeros(2)}, str(private))
        assert _mode(apply_umask(private)) == file_mode
    finally:
        os.umask(old)


def _not_shared(run_dir: Path) -> list[str]:
    """What in `run_dir` (itself included) is not 0755 (folders) / 0644 (files)."""
    return [
        f"{p.relative_to(run_dir.parent)} {oct(_mode(p))}"
        for p in [run_dir, *run_dir.rglob("*")]
        if not p.is_symlink() and _mode(p) != (0o755 if p.is_dir() else 0o644)
    ]


def test_every_artifact_of_a_run_is_shared_under_umask_022(tiny_overrides, tmp_path):
    old = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        args = [*tiny_overrides, *SHORT, "trainer.max_steps=10", "logger=csv", "strategy=random_neuron"]
        run(compose([*args, "strategy.export_merged=true"]))  # the merged export/ as well
    finally:
        os.umask(old)
    assert (run_dir / "neuron_set.safetensors").exists() and (run_dir / "neft_delta.safetensors").exists()
    assert (run_dir / "export").is_dir() and (run_dir / "metrics.json").exists()
    assert not _not_shared(run_dir), _not_shared(run_dir)
