"""What the CPU comparison (scripts/table_small_cpu.sh) rests on: the script resumes after a kill without redoing
finished jobs, a finished full fine-tune serves as NeFT's reference, early stopping, per-segment test losses and
evaluation under the training precision's autocast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, run_cli
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.evaluation.evaluate import autocast_dtype
from neft_lab.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


def _script(out: Path, cache: Path, extra: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MODEL": "tiny",
        "TASK": "embedded",
        "METHODS": "full,neft9",
        "SEEDS": "0,1",
        "STEPS": "4",
        "VAL_EVERY": "2",
        "SEARCH_STEPS": "2",
        "TEST": "6",
        "VAL": "6",
        "PRECISION": "32-true",
        "OUT": str(out),
        "EXTRA": f"paths.cache_dir={cache} {extra}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline",
        "NEFT_LAB_ROOT": str(out.parent),
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's python
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "table_small_cpu.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _summaries(printed: str) -> list[str]:
    return [
        line.split("] ", 1)[1] for line in printed.splitlines() if "sweep: " in line and "] sweep:" in line
    ]


def test_table_script_resumes_after_a_kill_without_redoing_finished_jobs(tmp_path):
    out, flag = tmp_path / "table", tmp_path / "killed"
    kill = (
        "+callbacks.kill._target_=sweep_helpers.KillOnce +callbacks.kill.step=3 "
        f"+callbacks.kill.flag={flag} +callbacks.kill.seed=${{seed}} +callbacks.kill.kill_seed=1"
    )
    first = _script(out, tmp_path / "cache", kill)
    assert first.returncode != 0 and flag.exists()  # killed in full fine-tuning's seed-1 run (SIGKILL)
    assert (out / "final" / "full" / "seed0" / "metrics.json").exists()
    assert not (out / "final" / "full" / "seed1" / "metrics.json").exists()

    second = _script(out, tmp_path / "cache", kill)
    printed = second.stdout + second.stderr
    assert second.returncode == 0, printed[-3000:]
    summaries = _summaries(printed)
    assert summaries[0].startswith("sweep: 4 jobs: 4 skipped, 0 resumed, 0 run, 0 failed"), (
        summaries
    )  # the grid
    # full fine-tuning's seeds: the first with the zero-shot score (once: greedy decoding), then the others
    assert summaries[1].startswith("sweep: 1 jobs: 1 skipped, 0 resumed, 0 run, 0 failed"), summaries
    assert summaries[2].startswith("sweep: 1 jobs: 0 skipped, 1 resumed, 0 run, 0 failed"), summaries
    assert summaries[3].startswith("sweep: 4 jobs: 0 skipped, 0 resumed, 4 run, 0 failed"), summaries
    assert summaries[4].startswith("sweep: 2 jobs: 0 skipped, 0 resumed, 2 run, 0 failed"), summaries
    assert "before" in read_metrics(out / "final" / "full" / "seed0")
    assert "before" not in read_metrics(out / "final" / "full" / "seed1")
    # the resumed run went on from its last checkpoint to the cap
    assert read_metrics(out / "final" / "full" / "seed1")["train"]["steps"] == 4
    # NeFT's seed-i run scored its neurons against full fine-tuning's seed-i run
    for seed in (0, 1):
        log = (out / "final" / "neft9" / f"seed{seed}" / "__main__.log").read_text()
        assert f"finished full fine-tune {out / 'final' / 'full' / f'seed{seed}'}" in log
    # every grid point once, and the report with the significance table and the curves
    from omegaconf import OmegaConf

    lrs = sorted(OmegaConf.load(p).optim.lr for p in (out / "search" / "neft9").glob("*/config.yaml"))
    assert lrs == [3e-5, 1e-4, 3e-4, 1e-3]
    table = (out / "final" / "report" / "table.md").read_text()
    assert "Paired bootstrap against **NeFT 9%**" in table and "| Full |" in table
    assert (out / "final" / "report" / "convergence.png").exists()


def _full_then_neft(tmp_path: Path, tiny: list[str]) -> tuple[Path, list[str]]:
    common = [
        *tiny,
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "eval.after=false",
    ]
    full_dir = tmp_path / "full"
    run(compose([*common, "strategy=full", f"paths.run_dir={full_dir}"]))
    return full_dir, common


def test_a_finished_full_fine_tune_is_the_reference(tmp_path, tiny_overrides):
    """The same full fine-tune as the built-in reference run gives the very same neuron set, without a run."""
    full_dir, common = _full_then_neft(tmp_path, tiny_overrides)
    builtin, given = tmp_path / "builtin", tmp_path / "given"
    run(compose([*common, "strategy=neft", "selection.reference.steps=4", f"paths.run_dir={builtin}"]))
    run(compose([*common, "strategy=neft", f"selection.reference.run={full_dir}", f"paths.run_dir={given}"]))
    a, b = load_file(builtin / "neuron_set.safetensors"), load_file(given / "neuron_set.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the full run's folder is read, never changed (reference.keep=false must not delete it)
    run(
        compose(
            [
                *common,
                "strategy=neft",
                f"selection.reference.run={full_dir}",
                "selection.reference.keep=false",
            ]
            + [f"paths.run_dir={tmp_path / 'again'}", f"paths.cache_dir={tmp_path / 'cache2'}"]
        )
    )
    assert (full_dir / "export" / "config.json").exists()


@pytest.mark.bad_input
def test_a_reference_run_that_cannot_serve_is_refused(tmp_path, tiny_overrides):
    full_dir, common = _full_then_neft(tmp_path, tiny_overrides)
    lora_dir = tmp_path / "lora"
    run(compose([*common, "strategy=lora", f"paths.run_dir={lora_dir}"]))
    cases = {
        str(tmp_path / "nowhere"): "not a run folder",
        str(lora_dir): "a strategy=lora run; the reference must be full fine-tuning",
    }
    for folder, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            run(compose([*common, "strategy=neft", f"selection.reference.run={folder}"]))
    (full_dir / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="has not finished"):
        run(compose([*common, "strategy=neft", f"selection.reference.run={full_dir}"]))


@pytest.mark.bad_input
def test_a_reference_run_of_another_model_is_refused(tmp_path, tiny_overrides):
    full_dir, common = _full_then_neft(tmp_path, tiny_overrides)
    with pytest.raises(ConfigError, match="a reference must start from the same base weights"):
        run(
            compose(
                [*common, "strategy=neft", f"selection.reference.run={full_dir}", "model.tiny.hidden_size=48"]
            )
        )


def test_early_stopping_ends_a_run_whose_validation_loss_stops_improving(tmp_path, tiny_overrides):
    """A learning rate far too high: the validation loss rises, and the run stops after `patience` checks."""
    cfg = compose(
        [
            *tiny_overrides,
            "callbacks=early_stopping",
            "callbacks.early_stopping.patience=1",
            "trainer.max_steps=60",
            "trainer.val_check_interval=5",
            "optim.lr=3.0",
            "optim.scheduler=constant",
            "eval.after=false",
        ]
    )
    run(cfg)
    train = read_metrics(tmp_path / "run")["train"]
    assert train["steps"] < 60
    assert Path(train["best_checkpoint"]).exists()


def test_per_segment_losses_add_up_and_evaluation_follows_the_training_autocast(tmp_path, tiny_overrides):
    common = [*tiny_overrides, "trainer.max_steps=2", "trainer.val_check_interval=2"]
    run(compose(common))
    metrics = read_metrics(tmp_path / "run")["after"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["loss_tokens"] > 0 for r in rows)
    total = sum(r["loss_sum"] for r in rows) / sum(r["loss_tokens"] for r in rows)
    assert total == pytest.approx(metrics["loss"], abs=1e-4)

    assert autocast_dtype("auto", "bf16-mixed") is torch.bfloat16
    assert autocast_dtype("auto", "32-true") is None and autocast_dtype("auto", "bf16-true") is None
    assert autocast_dtype("32", "bf16-mixed") is None and autocast_dtype("bf16", "32-true") is torch.bfloat16
    run(compose([*common, "eval.precision=bf16", f"paths.run_dir={tmp_path / 'bf16'}"]))
    bf16 = read_metrics(tmp_path / "bf16")["after"]
    assert bf16["loss"] == pytest.approx(metrics["loss"], rel=0.05) and bf16["loss"] != metrics["loss"]


@pytest.mark.bad_input
def test_unknown_eval_precision_is_refused(tmp_path, tiny_overrides):
    done = run_cli([*tiny_overrides, "eval.precision=fp8"], cwd=tmp_path)
    assert done.returncode == 2
    assert "eval.precision=fp8: choose one of auto, 32, bf16, 16" in done.stderr


def test_new_tokens_are_capped_by_the_source_length(tmp_path):
    """task.max_new_tokens_ratio: a batch stops at ratio x its longest source + 16 tokens, never past
    task.max_new_tokens; unset, the limit alone."""
    from neft_lab.data.encoding import PromptEncoder
    from neft_lab.data.examples import Example
    from neft_lab.data.task import Task
    from neft_lab.evaluation.generate import SOURCE_SLACK, batch_new_tokens, generate_predictions
    from neft_lab.models.loading import load_model

    cfg = compose(
        ["experiment=smoke", f"paths.cache_dir={tmp_path}", "task.max_new_tokens=200", "task.stop=[]"]
    )
    model, tokenizer = load_model(cfg.model)
    examples = [Example("a cat", "un chat"), Example("the black horse likes a bird", "x")]
    plain = PromptEncoder(tokenizer, Task.from_config(cfg.task))
    assert batch_new_tokens(plain, examples) == 200
    capped_cfg = compose([*[f"paths.cache_dir={tmp_path}"], "experiment=smoke", "task.max_new_tokens=200",
                          "task.stop=[]", "task.max_new_tokens_ratio=1.5"])  # fmt: skip
    capped = PromptEncoder(tokenizer, Task.from_config(capped_cfg.task))
    longest = max(len(tokenizer(e.source, add_special_tokens=False).input_ids) for e in examples)
    cap = int(torch.ceil(torch.tensor(1.5 * longest)).item()) + SOURCE_SLACK
    assert cap < 200 and batch_new_tokens(capped, examples) == cap
    assert batch_new_tokens(capped, examples, limit=5) == 5  # the limit still wins
    # what generation is asked for, batch by batch (sorted by length: the long source's batch, then the short)
    asked, real = [], model.generate

    def recording(*args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        out = real(*args, **kwargs)
        assert out.shape[1] - kwargs["input_ids"].shape[1] <= kwargs["max_new_tokens"]
        return out

    model.generate = recording
    generate_predictions(model, capped, examples, batch_size=1, progress=False)
    short = len(tokenizer("a cat", add_special_tokens=False).input_ids)
    assert asked == [cap, int(torch.ceil(torch.tensor(1.5 * short)).item()) + SOURCE_SLACK]
    with pytest.raises(ConfigError, match="max_new_tokens_ratio=-1"):
        Task.from_config(compose(["experiment=smoke", "task.max_new_tokens_ratio=-1"]).task)
