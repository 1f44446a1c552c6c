"""The notebooks as a user runs them (issue 19, A7): where they look by default, and what they group."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _execute(cells: list, cwd: Path, env: dict[str, str]) -> None:
    """Run `cells` in a kernel started in `cwd` (as Jupyter starts one in the notebook's folder)."""
    notebook = nbformat.v4.new_notebook(cells=cells)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_neuron_analysis_finds_the_folder_stage_analyze_wrote(tmp_path):
    """Its default was ../outputs/analysis, where stage=analyze never writes (it writes <first run>/analysis): the
    notebook said "run stage=analyze first" after one had. Unset, it takes the newest analysis under ../outputs."""
    notebook = nbformat.read(REPO / "notebooks" / "neuron_analysis.ipynb", as_version=4)
    older, newer = (tmp_path / "outputs" / "runs" / name / "analysis" for name in ("a", "b"))
    for folder in (older, newer):
        folder.mkdir(parents=True)
        (folder / "analysis.json").write_text("{}")
        time.sleep(0.01)
    os.utime(older / "analysis.json", (1, 1))
    (tmp_path / "notebooks").mkdir()
    check = nbformat.v4.new_code_cell(
        f"assert ANALYSIS.resolve() == Path({str(newer)!r}).resolve(), ANALYSIS\n"
        f"assert FIGURES.resolve() == Path({str(newer / 'notebook_figures')!r}).resolve(), FIGURES"
    )
    _execute([notebook.cells[1], check], tmp_path / "notebooks", {"NEFT_LAB_ANALYSIS": ""})

    from neft_lab.analysis.artifacts import find_analysis
    from neft_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage=analyze.*<first run>/analysis.*NEFT_LAB_ANALYSIS"):
        find_analysis(tmp_path / "nothing-here")


def test_compare_runs_keeps_models_and_methods_apart(tmp_path):
    """It grouped by task and strategy only: two models' runs pooled into one bar whose error bar went below 0."""
    for model, base in (("tiny", 2.0), ("gemma", 80.0)):
        for seed in (0, 1):
            folder = tmp_path / f"{model}-{seed}"
            folder.mkdir()
            metrics = {"model": model, "task": "t", "seed": seed, "strategy": "full", "trainable_percent": 100.0,
                       "after": {"bleu": base + seed}}  # fmt: skip
            (folder / "metrics.json").write_text(json.dumps(metrics))
            config = {
                "strategy": {"name": "full"},
                "selection": {"name": "none"},
                "task": {"kind": "translation"},
            }
            (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    check = nbformat.v4.new_code_cell(
        "assert sorted(summary['model']) == ['gemma', 'tiny'], summary\n"
        "assert (summary['count'] == 2).all(), summary\n"
        "assert (summary['mean'] - lower >= 0).all()  # no error bar below 0"
    )
    _execute([*notebook.cells, check], REPO / "notebooks", {"NEFT_LAB_RUNS": str(tmp_path)})
    assert (tmp_path / "compare_runs.png").stat().st_size > 1000
