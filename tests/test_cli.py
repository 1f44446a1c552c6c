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
    evaluated = [p for p in _runs(tmp_path / "outputs" / "runs") if p != run_dir]
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
