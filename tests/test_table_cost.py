"""benchmarks/table_cost.py: a CPU table's cost per method, with paused and evaluation-only attempts kept out of
the undisturbed estimate but counted in the sum of walls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import table_cost  # noqa: E402


def write_run(
    folder: Path, steps: int, train_s: float, median: float, wall: float, before_s: float = 0.0
) -> None:
    folder.mkdir(parents=True)
    metrics = {
        "train": {"steps": steps, "seconds": train_s, "step_seconds_median": median},
        "wall_seconds": wall,
    }
    if before_s:
        metrics["before"] = {"seconds": before_s}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_the_estimate_uses_the_fastest_whole_run_and_the_walls_count_everything(tmp_path):
    for trial, wall in enumerate([60.0, 120.0]):
        write_run(tmp_path / "search" / "neft9" / str(trial), 12, wall - 5, 2.0, wall)
    write_run(tmp_path / "final" / "neft9" / "seed0", 60, 300.0, 3.0, 600.0)  # whole: 10 min
    write_run(tmp_path / "final" / "neft9" / "seed1", 60, 3000.0, 3.0, 3600.0)  # paused: 60 min
    write_run(tmp_path / "final" / "neft9" / "seed2", 60, 2.0, 3.0, 300.0)  # only evaluated: 5 min
    write_run(tmp_path / "final" / "full" / "seed0", 60, 420.0, 7.0, 1800.0, before_s=600.0)
    table = table_cost.cost_table(tmp_path)
    rows = {
        cells[0]: cells
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])
    }
    assert list(rows)[0] == "full"  # full fine-tuning first, as in the report
    # neft9: 2 trials x 1 min (the fastest) + 3 final runs x 10 min (seed 0; seed 2's attempt only evaluated)
    assert rows["neft9"][6:8] == ["32", "78"]  # walls: (60 + 120 + 600 + 3600 + 300) / 60 = 78
    assert rows["full"][5:7] == ["30.0", "30"]  # the zero-shot evaluation is inside its wall
    assert "zero-shot evaluation 10 min included" in table
    assert "| 72 (1.2 h) | 108 (1.8 h) |" in table  # 32 + 30 + 10 estimated; 78 + 30 of walls


def test_the_command_names_a_folder_without_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "table_cost.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "has no search/ or final/ folder" in result.stderr


def test_the_kinds_table_counts_each_kind_against_the_models_vectors(tmp_path):
    import neuron_set_kinds

    signature = {"up.0": [4, 8], "down.0": [4, 8], "up.1": [4, 8], "down.1": [4, 8]}
    for seed, down in enumerate([{"0": 4, "1": 3}, {"0": 4, "1": 4}]):
        folder = tmp_path / "neft" / f"seed{seed}"
        folder.mkdir(parents=True)
        summary = {
            "kinds": ["up", "down"],
            "signature": signature,
            "per_layer": {"down": down, "up": {"0": 1}},
        }
        (folder / "neuron_set.json").write_text(json.dumps(summary))
    table = neuron_set_kinds.kinds_table(tmp_path)
    assert "| neft | 2 | 7–8 of 8 (88–100%) | 1 of 8 (12%) |" in table
    with pytest.raises(SystemExit, match="no \\*/\\*/neuron_set.json"):
        neuron_set_kinds.kinds_table(tmp_path / "neft")


def test_the_collect_script_copies_the_small_outputs_and_no_tensors(tmp_path):
    out, dest = tmp_path / "out", tmp_path / "dest"
    run_dir = out / "final" / "neft9" / "seed0"
    small = ["metrics.json", "config.yaml", "predictions.jsonl", "neuron_set.json", "csv/metrics.csv"]
    large = [
        "checkpoints/last.ckpt",
        "neuron_set.safetensors",
        "neft_delta.safetensors",
        ".hydra/config.yaml",
    ]
    for name in small + large + ["../report/table.md"]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    (out / "search" / "neft9").mkdir(parents=True)
    (out / "search" / "neft9" / "optimization_results.yaml").write_text("best_params: {}")
    subprocess.run(
        ["bash", str(REPO / "scripts" / "table_small_cpu_collect.sh")],
        env={**os.environ, "OUT": str(out), "DEST": str(dest)},
        check=True,
        capture_output=True,
    )
    copied = sorted(str(path.relative_to(dest)) for path in dest.rglob("*") if path.is_file())
    assert copied == sorted(
        ["search/neft9/optimization_results.yaml"] + [f"final/neft9/seed0/{name}" for name in small]
    )
