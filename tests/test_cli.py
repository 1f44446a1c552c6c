"""The command line as a user types it: `python -m neft_lab ...` in a fresh process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, run_cli

FAST = ["experiment=smoke", "trainer.enable_progress_bar=false"]


def _runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.json"))


def test_smoke_trains_evaluates_and_eval_stage_reproduces(tmp_path):
    done = run_cli(FAST, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = _runs(tmp_path / "outputs" / "runs")
    metrics = read_metrics(run_dir)
    assert metrics["after"]["bleu"] > metrics["before"]["bleu"]
    assert metrics["after"]["chrf"] > 30
    assert "after:" in done.stdout + done.stderr  # the outcome is printed, not only written
    # the saved result scores the same when evaluated again from its run folder
    again = run_cli(["stage=eval", f"ckpt={run_dir}", "threads=1"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    evaluated = _runs(tmp_path / "outputs" / "evals")  # evals/<time>-<task>-<strategy>-<time of the run>
    assert len(evaluated) == 1
    rerun = read_metrics(evaluated[0])
    assert rerun["ckpt"] == str(run_dir)
    assert abs(rerun["after"]["bleu"] - metrics["after"]["bleu"]) < 1e-6


def test_sweep_file_multirun_report_and_notebook(tmp_path):
    """`sweeps/strategies.yaml` runs full × LoRA × NeFT × 2 seeds; the report and the notebook list every job."""
    done = run_cli(
        [
            "-m",
            "--config-dir",
            str(REPO / "sweeps"),
            "--config-name",
            "strategies",
            *FAST,
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "eval.before=false",
            "++selection.reference.steps=20",
            "task.data.embedded.n_test=8",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    runs = _runs(sweep_dir)
    jobs = sorted((read_metrics(r)["strategy"], read_metrics(r)["seed"]) for r in runs)
    assert jobs == [(s, seed) for s in ("full", "lora", "neft") for seed in (0, 1)]
    assert all(
        read_metrics(r)["trainable_percent"] < 100 for r in runs if read_metrics(r)["strategy"] != "full"
    )

    report = run_cli(["stage=report", f"report.dir={sweep_dir}"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (sweep_dir / "report" / "table.md").read_text()
    for label in ("Full", "LoRA r=8", "NeFT 9%"):
        assert f"| {label} |" in table and table.split(f"| {label} |")[1].split("\n")[0].count("(n=2)") >= 2

    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    os.environ["NEFT_LAB_RUNS"] = str(sweep_dir)
    try:
        nbclient.NotebookClient(
            notebook, timeout=120, resources={"metadata": {"path": str(REPO / "notebooks")}}
        ).execute()
    finally:
        del os.environ["NEFT_LAB_RUNS"]
    assert (sweep_dir / "compare_runs.png").stat().st_size > 1000
    table = notebook.cells[2]["outputs"][0]["data"]["text/plain"]
    assert "lora" in table and "full" in table and "neft" in table


def test_bad_input_exits_with_a_clear_message(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.zh").write_text("一\n二\n")
    (tmp_path / "d" / "train.en").write_text("one\n")
    done = run_cli(
        ["model=tiny", "task=wmt_zh_en", f"task.data.data_dir={tmp_path / 'd'}", "logger=none"], cwd=tmp_path
    )
    assert done.returncode == 2
    assert "train.zh has 2 lines but" in done.stderr and "Traceback" not in done.stderr
    done = run_cli(["model=tiny", "task=wmt_zh_en", "logger=none"], cwd=tmp_path)
    assert (
        done.returncode == 2 and "Point task.data.data_dir" in done.stderr
    )  # hub unreachable: use local files


@pytest.mark.bad_input
def test_a_config_error_is_refused_before_torch_and_lightning_are_imported(tmp_path):
    """The config is checked before the heavy imports (seconds on a busy machine): a typo costs about a second.
    `-X importtime` lists every module the process imported, on stderr."""
    import subprocess
    import sys

    env = {**os.environ, "NEFT_LAB_ROOT": str(tmp_path)}
    for bad in (
        "optim.lr=abc",
        "trainer.max_steps=0",
        "seed=-1",
        "eval.precision=fp8",
        "optim.scheduler=cosin",
    ):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "neft_lab", "model=tiny", "logger=none", bad],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and f"neft_lab error: {bad.split('=')[0]}=" in done.stderr, done.stderr[
            -2000:
        ]
        imported = {
            line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "import time:" in line
        }
        assert not imported & {"torch", "lightning", "transformers"}, bad
    assert list((tmp_path / "outputs" / "failed").rglob("__main__.log"))  # the folder set aside, log named


@pytest.mark.bad_input
def test_mistyped_key_suggests_the_closest_in_one_line(tmp_path):
    """`optim.lrr=1e-4` is refused before the job starts: exit 2, one line naming the closest key, no traceback
    (not Hydra's "append with +" hint); group choices on the command line count (strategy=lora has strategy.r)."""
    for args, line in (
        (["optim.lrr=1e-4"], "neft_lab error: unknown key 'optim.lrr': did you mean 'optim.lr'?"),
        (
            ["-m", "strategy=lora", "seed=0,1", "strategy.rr=4"],
            "unknown key 'strategy.rr': did you mean 'strategy.r'?",
        ),
    ):
        done = run_cli(args, cwd=tmp_path, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().endswith(line) and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr and "+optim.lrr" not in done.stderr
        assert not (tmp_path / "outputs").exists()  # no run folder for a refused command
    # keys that exist, additions with +, hydra.* and group sweeps still compose (--cfg job prints, runs nothing)
    done = run_cli(
        [
            "--cfg",
            "job",
            "strategy=lora",
            "strategy.r=4",
            "optim.betas.0=0.8",
            "+extra.note=1",
            "hydra.job.chdir=false",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: 1" in done.stdout and "r: 4" in done.stdout


@pytest.mark.bad_input
def test_base_task_configs_are_not_task_choices(tmp_path):
    """The shared translation/summarization defaults are no `task=` option: picking one gets Hydra's short
    "Could not find" with the real tasks listed, not a crash deep in the run."""
    done = run_cli(["task=_translation"], cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    assert "Could not find 'task/_translation'" in done.stderr and "Traceback" not in done.stderr
    assert "wmt_zh_en" in done.stderr
    assert "_summarization" not in done.stderr and "task_base" not in done.stderr


def test_help_says_what_the_tool_is_and_shows_the_main_commands(tmp_path):
    done = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert "neuron-level fine-tuning (NeFT)" in text
    for command in (
        "experiment=quickstart",
        "experiment=smoke",
        "-m strategy=full,lora",
        "stage=eval",
        "stage=report",
    ):
        assert f"python -m neft_lab {command}" in text, command
    tasks = (
        "alpaca_ifeval, cnn_dm, embedded, summarization, translation, wmt_de_en, wmt_en_zh, wmt_zh_en, xsum"
    )
    assert f"task: {tasks}" in text  # the config groups
    for group in ("model:", "strategy:", "selection:", "trainer:", "experiment:"):
        assert f"\n{group} " in text, group
    assert "--cfg" in text
    assert "_translation" not in text and "_summarization" not in text and "task_base" not in text
