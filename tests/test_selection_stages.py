"""NeFT's selection chain as stages (reference → score → select → fit), the scorers behind it, and what
keeps them honest: stages run apart give the one-command chain's set, stale inputs are refused, and
nothing under neurons/ or strategies/ starts a run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.neurons import scores_file
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.pipeline import run
from neft_lab.validation import validate

SHORT = ["trainer.max_steps=4", "trainer.val_check_interval=2", "eval.before=false", "eval.after=false"]


def _stage(base: list[str], stage: str, *extra: str) -> None:
    run(compose([*base, *SHORT, f"stage={stage}", *extra]))


def _cached_scores(cache: Path, scorer: str = "cosine") -> Path:
    pattern = (
        "neft/*/scores.safetensors"
        if scorer in ("cosine", "lora_reference")
        else f"scores/{scorer}-*/scores.safetensors"
    )
    found = sorted(cache.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _same_set(a: NeuronSet, b: NeuronSet) -> bool:
    return a.indices.keys() == b.indices.keys() and all(
        torch.equal(a.indices[k], b.indices[k]) for k in a.indices
    )


def test_stages_run_apart_give_the_chains_neuron_set_bit_for_bit(tiny_overrides, tmp_path):
    chain_cache, apart_cache = tmp_path / "chain-cache", tmp_path / "apart-cache"
    base = [o for o in tiny_overrides if not o.startswith("paths.cache_dir")]
    run(compose([*base, *SHORT, "strategy=neft", f"paths.cache_dir={chain_cache}"]))
    chained = NeuronSet.load(tmp_path / "run" / "neuron_set.safetensors")

    apart = [*base, f"paths.cache_dir={apart_cache}", "selection=cosine"]
    _stage(apart, "reference")
    assert list(
        apart_cache.glob("neft/*/reference/export/config.json")
    )  # the reference, and nothing more yet
    assert not list(apart_cache.glob("neft/*/scores.safetensors"))
    _stage(apart, "score")
    scores = _cached_scores(apart_cache)
    out = tmp_path / "sets" / "cosine9"
    _stage(apart, "select", f"selection.scores={scores}", f"selection.out={out}")
    selected = NeuronSet.load(out.with_suffix(".safetensors"))
    assert _same_set(selected, chained) and selected.num_vectors > 0
    assert selected.meta["scorer"] == "cosine" and selected.meta["scores_file"] == str(scores)

    # fit on that set: the run trains exactly those vectors
    run(compose([*base, *SHORT, "strategy=neft", "selection=from_file", f"selection.file={out}.safetensors",
                 f"paths.run_dir={tmp_path / 'fit'}", f"paths.cache_dir={apart_cache}"]))  # fmt: skip
    assert _same_set(NeuronSet.load(tmp_path / "fit" / "neuron_set.safetensors"), chained)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("model.tiny.seed=1", "fingerprints.model"),  # another model
        ("task.data.embedded.seed=1", "fingerprints.data"),  # other task data
        ("selection.reference.steps=3", "trainer.max_steps"),  # other reference settings
    ],
)
def test_a_stale_scores_file_is_refused_naming_what_differs(tiny_overrides, tmp_path, change, named):
    base = [*tiny_overrides, "selection=cosine"]
    _stage(base, "score")
    scores = _cached_scores(tmp_path / "cache")
    _stage(
        base, "select", f"selection.scores={scores}", f"selection.out={tmp_path / 'ok'}"
    )  # its own config: fine
    with pytest.raises(ConfigError, match=rf"scores file .* was made for other settings .*{named}") as err:
        _stage(base, "select", f"selection.scores={scores}", f"selection.out={tmp_path / 'stale'}", change)
    assert "stage=score" in str(err.value)
    assert not (tmp_path / "stale.safetensors").exists()


def test_a_changed_data_file_is_scored_again_not_reused(tiny_overrides, tmp_path):
    """The cache key holds the training data's fingerprint: new data, new reference and scores."""
    base = [*tiny_overrides, "selection=gradient", "selection.gradient.batches=2"]
    _stage(base, "score")
    _stage(base, "score", "task.data.embedded.n_train=300")
    assert len(list((tmp_path / "cache").glob("scores/gradient-*/scores.safetensors"))) == 2


def test_gradient_stage_selects_the_highest_scores_first(tiny_overrides, tmp_path):
    base = [*tiny_overrides, "selection=gradient", "selection.gradient.batches=2"]
    _stage(base, "select", f"selection.out={tmp_path / 'g'}")
    assert not list((tmp_path / "cache").glob("neft/*"))  # no reference fine-tune was run
    chosen = NeuronSet.load(tmp_path / "g.safetensors")
    values, _ = scores_file.load(_cached_scores(tmp_path / "cache", "gradient"))
    picked = torch.cat([values[k][i] for k, i in chosen.indices.items()])
    rest = torch.cat([values[k][[j for j in range(v.numel()) if j not in set(chosen.indices.get(k, torch.tensor([])).tolist())]]
                      for k, v in values.items()])  # fmt: skip
    assert picked.min() >= rest.max()  # most important (highest Fisher) first
    assert chosen.meta["scorer"] == "gradient" and chosen.meta["reference_steps"] is None


@pytest.mark.parametrize(
    ("selection", "scorer"), [("lora_reference", "lora_reference"), ("activation_probe", "activation_ridge")]
)
def test_lora_reference_and_probe_stages_end_in_a_neft_run(tiny_overrides, tmp_path, selection, scorer):
    run(
        compose(
            [
                *tiny_overrides,
                *SHORT,
                "strategy=neft",
                f"selection={selection}",
                "selection.activation_ridge.max_examples=32",
            ]
        )
    )
    chosen = NeuronSet.load(tmp_path / "run" / "neuron_set.safetensors")
    assert chosen.meta["scorer"] == scorer and chosen.num_vectors > 0
    if scorer == "lora_reference":
        assert list((tmp_path / "cache").glob("neft/lora-*/reference/export/adapter_config.json"))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage=reference", "selection=gradient"], "needs no reference run"),
        (["stage=score"], "needs a scored selection"),
        (["stage=score", "selection=random"], "needs no scores"),
        (
            ["stage=select", "selection=cosine", "selection.scores=/nonexistent/scores.safetensors"],
            "no such file",
        ),
        (["stage=score", "selection=cosine", "selection.scorer=fisher"], "unknown scorer"),
        (
            ["stage=score", "selection=probe", "selection.probe.file=/nonexistent.jsonl"],
            "selection.probe.file",
        ),
        (["stage=score", "selection=gradient", "selection.gradient.batches=0"], "selection.gradient.batches"),
    ],
)
def test_selection_stage_settings_are_checked_before_anything_loads(tiny_overrides, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([*tiny_overrides, *overrides]))


def test_no_code_under_neurons_or_strategies_starts_a_run_and_the_import_cycle_is_gone():
    code = (
        "import sys, neft_lab.strategies, neft_lab.selection_workflow, neft_lab.neurons.scorers.gradient, "
        "neft_lab.neurons.scorers.probe, neft_lab.neurons.scorers.lora_reference; "
        "assert 'neft_lab.pipeline' not in sys.modules and 'neft_lab.chain' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('neft_lab'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for folder in ("neurons", "strategies"):
        for path in (REPO / "src" / "neft_lab" / folder).rglob("*.py"):
            text = path.read_text()
            imports = re.findall(r"^\s*(?:from|import) (neft_lab[\w.]*)(?: import ([\w, ]+))?", text, re.M)
            for module, names in imports:
                used = {module} | {f"{module}.{n.strip()}" for n in names.split(",") if n.strip()}
                assert not used & {"neft_lab.pipeline", "neft_lab.chain"}, (path, module, names)
            assert ".fit(" not in text and "pipeline.run" not in text, path


def test_metrics_record_the_scorer_and_the_settings_that_define_the_method(tiny_overrides, tmp_path, caplog):
    """Issue 19 A1: a selection=gradient run's metrics.json said "selection": "cosine" (the method, not the scorer)."""
    caplog.set_level("INFO")
    run(
        compose(
            [
                *tiny_overrides,
                *SHORT,
                "strategy=neft",
                "selection=gradient",
                "selection.gradient.batches=2",
                "selection.pooling=per_layer",
            ]
        )
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selection"] == "gradient"
    assert metrics["selection_settings"] == {
        "scorer": "gradient",
        "method": "cosine",
        "budget_kind": "share",
        "budget_value": 0.09,
        "pooling": "per_layer",
        "modules": ["up", "down"],
        "reference_steps": None,  # no reference run for this scorer
        "reference_horizon": None,
        "reverse_share": None,
    }
    assert "neuron set (gradient" in caplog.text and "neuron set (cosine)" not in caplog.text


def test_scores_that_cannot_separate_vectors_are_warned_about_naming_the_setting(
    tiny_overrides, tmp_path, caplog
):
    """Issue 19 A5: debug=fast's 4-step reference gave cosine min/median/max all 1.0000 and the selection among
    them was noise, silently. A reference that barely moved is warned about, naming selection.reference.steps."""
    caplog.set_level("WARNING")
    base = [*tiny_overrides, "selection=cosine"]
    _stage(base, "select", f"selection.out={tmp_path / 'a'}", "selection.reference.lr=1e-9")
    warned = [r.getMessage() for r in caplog.records if "cannot separate" in r.getMessage()]
    assert len(warned) == 1 and "selection.reference.steps" in warned[0], caplog.text
    caplog.clear()
    _stage(base, "select", f"selection.out={tmp_path / 'b'}")  # lr 3e-3: the reference moves every vector
    assert "cannot separate" not in caplog.text


def test_select_writes_under_outputs_and_prints_a_next_command_that_runs_as_printed(tmp_path):
    """Issue 19 A8: stage=select printed `strategy=neft selection=from_file selection.file=...` without the user's
    overrides (copied verbatim it loaded Gemma and failed on a shape mismatch), and a relative selection.out
    (the README's `sets/neft6`) wrote into the working directory."""
    settings = [
        "experiment=smoke",
        "trainer.max_steps=2",
        "eval.before=false",
        "eval.after=false",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    select = [
        *settings,
        "stage=select",
        "selection=gradient",
        "selection.gradient.batches=2",
        "selection.out=sets/g9",
    ]
    done = run_cli(select, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "sets").exists()  # nothing in the working directory
    written = tmp_path / "outputs" / "sets" / "g9.safetensors"  # relative to paths.output_dir
    assert written.is_file()
    printed = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "python -m neft_lab strategy=neft" in line
    ]
    assert len(printed) == 1, done.stdout + done.stderr
    command = shlex.split(printed[0][printed[0].index("python -m neft_lab") :])
    assert command[:3] == ["python", "-m", "neft_lab"]
    args = command[3:]
    assert f"selection.file={written}" in args and "selection=from_file" in args
    assert set(settings) <= set(args) and not any(
        a.startswith(("stage=", "selection.out", "selection.gradient")) for a in args
    )
    run(compose([*args, f"paths.run_dir={tmp_path / 'run'}"]))  # as printed, in-process (faster)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["selection"] == "from_file"
