"""A run folder is data, not code, and one job's: reading a saved run never runs what it names, a crafted
checkpoint never deletes outside its folder, a copied folder resumes into itself, two jobs never share a
folder, leftovers of a kill are cleaned up, and a refused or no-op rerun leaves the folder as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import REPO, read_metrics, run_cli, run_in_process
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.pipeline import run
from neft_lab.training.checkpoints import load_checkpoint

STEPS = [
    "experiment=smoke",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=24",
    "trainer.val_check_interval=5",
    "eval.after=false",
    "eval.before=false",
    "task.data.embedded.n_train=96",
]
CRASH = ["+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=13"]


def _in_process(tmp_path: Path, run_dir: Path, *extra: str) -> None:
    run_in_process(STEPS, tmp_path, run_dir, *extra)


def _crashed(tmp_path: Path, run_dir: Path, *extra: str) -> Path:
    """A run killed at step 13 (last.ckpt at step 10) whose config.yaml is the command's without the crash."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process(tmp_path, run_dir, *CRASH, *extra)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["callbacks"]["crash"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    return run_dir


def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------
# B1: a run folder's files never run code


def _hostile_run(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "hostile"
    cfg = compose([*STEPS, f"paths.run_dir={folder}", f"paths.cache_dir={tmp_path / 'cache'}"])
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["strategy"] = {
        "_target_": "subprocess.Popen",
        "args": f"touch {marker}",
        "shell": True,
        "name": "full",
    }
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    return folder


@pytest.mark.fault
@pytest.mark.parametrize("how", ["resume", "eval"])
def test_a_saved_config_naming_a_foreign_class_runs_nothing(tmp_path, how):
    marker = tmp_path / "PWNED"
    folder = _hostile_run(tmp_path, marker)
    extra = (
        [f"resume={folder}"]
        if how == "resume"
        else [
            "stage=eval",
            f"ckpt={folder / 'checkpoints' / 'last.ckpt'}",
            f"paths.run_dir={tmp_path / 'eval'}",
        ]
    )
    with pytest.raises(ConfigError, match=r"strategy\._target_.*subprocess\.Popen"):
        run(compose([*STEPS, f"paths.cache_dir={tmp_path / 'cache'}", *extra]))
    time.sleep(0.2)  # a shell started by Popen would have touched it by now
    assert not marker.exists(), "a saved config.yaml ran a command"


@pytest.mark.fault
def test_a_saved_config_cannot_enable_trust_remote_code(tmp_path, monkeypatch):
    from neft_lab.models.loading import load_model

    marker = tmp_path / "PWNED"
    folder = tmp_path / "hostile"
    cfg = compose([*STEPS, f"paths.run_dir={folder}", f"paths.cache_dir={tmp_path / 'cache'}"])
    model, tokenizer = load_model(cfg.model)
    model.save_pretrained(folder / "export")
    tokenizer.save_pretrained(folder / "export")
    config = json.loads((folder / "export" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "export" / "config.json").write_text(json.dumps(config))
    (folder / "export" / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["model"]["trust_remote_code"] = True
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # where transformers would copy the module
    done = run_cli(
        ["stage=eval", f"ckpt={folder}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path
    )
    assert not marker.exists(), "a saved config.yaml enabled trust_remote_code"
    assert done.returncode == 2 and "trust_remote_code" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------
# B2: a crafted checkpoint never deletes outside its folder


@pytest.mark.fault
def test_checkpoint_paths_pointing_outside_the_run_delete_nothing(tmp_path):
    run_dir = _crashed(tmp_path, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    outside = str(run_dir / "checkpoints" / ".." / ".." / "victim")
    for callback_state in state["callbacks"].values():
        if isinstance(callback_state, dict) and "dirpath" in callback_state:
            callback_state.update(
                last_model_path=outside, kth_best_model_path=outside, best_model_path=outside
            )
            callback_state["best_k_models"] = {outside: torch.tensor(0.0)}
    last.unlink()  # it may be a second name of the best checkpoint: write a new file
    torch.save(state, last)
    _in_process(tmp_path, run_dir)
    assert (victim / "precious.txt").read_text() == "keep me", "resuming deleted a folder outside the run"
    assert read_metrics(run_dir)["train"]["steps"] == 24


# ------------------------------------------------------------------------------------------------
# B3: a copied or moved run folder resumes into itself


@pytest.mark.fault
@pytest.mark.parametrize("how", ["copy", "move"])
def test_resuming_a_copied_or_moved_folder_writes_only_there(tmp_path, how):
    original = _crashed(tmp_path, tmp_path / "A", "logger=csv")
    other = tmp_path / "B"
    if how == "copy":
        shutil.copytree(original, other, symlinks=True)
        before = _files(original)
    else:
        shutil.move(original, other)
    rows = len((other / "csv" / "metrics.csv").read_text().splitlines())
    _in_process(tmp_path, other, f"resume={other}")
    if how == "copy":
        assert _files(original) == before, "resuming the copy wrote into the original"
    else:
        assert not original.exists(), "resuming the moved folder re-created the original"
    assert read_metrics(other)["train"]["steps"] == 24
    assert load_checkpoint(other / "checkpoints" / "last.ckpt")["global_step"] == 20
    assert len((other / "csv" / "metrics.csv").read_text().splitlines()) > rows, "the CSV log went elsewhere"


# ------------------------------------------------------------------------------------------------
# B5: two jobs never share a run folder


class SleepAtStep(L.Callback):
    """Touches `marker` at `step` and sleeps (a job still running when a second one starts)."""

    def __init__(self, step: int, marker: str, seconds: float = 60) -> None:
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step == self.step:
            self.marker.touch()
            time.sleep(self.seconds)


@pytest.mark.fault
def test_a_second_job_in_a_busy_run_folder_refuses(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "busy"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
    }
    env.update(WANDB_MODE="offline", NEFT_LAB_ROOT=str(tmp_path))
    args = [*STEPS, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = subprocess.Popen(
        [sys.executable, "-m", "neft_lab", *args, "+callbacks.sleep._target_=test_run_folder_safety.SleepAtStep",
         "+callbacks.sleep.step=3", f"+callbacks.sleep.marker={marker}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), (
            first.stderr.read()[-2000:] if first.poll() is not None else "first job stalled"
        )
        with pytest.raises(ConfigError, match="another job"):
            _in_process(tmp_path, run_dir)
        assert not list((run_dir / "checkpoints").glob("*-v1.ckpt"))
        assert not (run_dir / "metrics.json").exists()
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------------------------
# B10: leftovers of a kill


@pytest.mark.fault
def test_temporary_files_of_a_killed_run_are_removed_on_the_next(tmp_path):
    run_dir = _crashed(tmp_path, tmp_path / "run")
    tmp_file = run_dir / "checkpoints" / ".last.ckpt.k3j2x9.tmp"
    tmp_file.write_bytes(b"x" * 1000)
    tmp_export = run_dir / ".export.a8f0q1.tmp"
    tmp_export.mkdir()
    (tmp_export / "model.safetensors").write_bytes(b"x" * 1000)
    tmp_metrics = run_dir / ".metrics.json.zz1.tmp"
    tmp_metrics.write_text("{")
    _in_process(tmp_path, run_dir)
    assert not tmp_file.exists() and not tmp_export.exists() and not tmp_metrics.exists()
    assert read_metrics(run_dir)["train"]["steps"] == 24


@pytest.mark.fault
def test_a_missing_last_checkpoint_resumes_from_the_best_and_keeps_one_best(tmp_path, caplog):
    run_dir = _crashed(tmp_path, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last.ckpt").unlink()
    best = [p for p in checkpoints.glob("*.ckpt")]
    assert len(best) == 1 and load_checkpoint(best[0])["global_step"] == 10
    _in_process(tmp_path, run_dir)
    assert "last.ckpt is missing: resuming from" in caplog.text and best[0].name in caplog.text
    assert read_metrics(run_dir)["train"]["steps"] == 24
    kept = sorted(p.name for p in checkpoints.glob("*.ckpt") if p.name != "last.ckpt")
    assert len(kept) == 1, f"an old best checkpoint stayed beside the final one: {kept}"


# ------------------------------------------------------------------------------------------------
# B13: a refused or no-op rerun leaves .hydra/ as it was


@pytest.mark.fault
def test_a_refused_or_no_op_rerun_does_not_rewrite_hydra_files(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *STEPS,
        "trainer.max_steps=4",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()

    def state() -> dict[Path, tuple[bytes, int]]:
        return {
            p: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in run_dir.rglob("*")
            if p.is_file() and p.suffix != ".log"
        }

    before = state()
    refused = run_cli([*args, "optim.lr=1e-3"], tmp_path)
    assert refused.returncode == 2 and "another config" in refused.stderr
    assert state() == before, "a refused rerun rewrote files of the finished run"
    again = run_cli(args, tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stderr + again.stdout
    assert state() == before, "a no-op rerun rewrote files of the finished run"
