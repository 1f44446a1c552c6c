"""The paper's chain end to end on the tiny model: reference → scores → selection → NeFT → export."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.models.loading import load_pretrained
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.pipeline import run

FAST = [
    "trainer.max_steps=30",
    "trainer.val_check_interval=15",
    "selection.reference.steps=20",
    "eval.before=false",
]


def _neft(tiny_overrides, tmp_path, *extra):
    run(compose(tiny_overrides + FAST + ["strategy=neft", *extra]))
    return tmp_path / "run"


def test_neft_chain_trains_only_selected_vectors(tiny_overrides, tmp_path):
    run_dir = _neft(tiny_overrides, tmp_path, "strategy.export_merged=true")  # also the merged export/
    metrics = read_metrics(run_dir)
    assert metrics["strategy"] == "neft" and metrics["selection"] == "cosine" and metrics["impl"] == "fused"
    assert metrics["trainable_parameters"] == metrics["neuron_parameters"] == metrics["neuron_vectors"] * 64
    assert abs(metrics["neuron_percent"] - 9.0) < 0.1  # the 9% budget, met to one vector
    neuron_set = NeuronSet.load(run_dir / "neuron_set.safetensors")
    assert neuron_set.meta["reference_steps"] == 20 and neuron_set.scores
    # the merged export differs from the base model only in the selected vectors
    base, _ = build_tiny_model("llama")
    trained = load_pretrained(run_dir / "export", torch.float32)
    base_state, trained_state = base.state_dict(), trained.state_dict()
    masks = neuron_set.masks()
    changed_vectors = 0
    for name, tensor in trained_state.items():
        group = next((g for g in neuron_set.space.groups if g.weight == name), None)
        if group is None:
            assert torch.equal(tensor, base_state[name]), f"{name} is not selected but changed"
            continue
        moved = (tensor != base_state[name]).any(dim=1 - group.axis)
        assert not (moved & ~masks[group.name]).any(), f"unselected vectors of {name} changed"
        changed_vectors += int(moved.sum())
    assert changed_vectors > 0.9 * neuron_set.num_vectors
    delta = load_file(str(run_dir / "neft_delta.safetensors"))
    assert sum(v.numel() for k, v in delta.items() if k.endswith(".vectors")) == metrics["neuron_parameters"]


def test_scores_are_cached_across_budgets_and_selections(tiny_overrides, tmp_path):
    _neft(tiny_overrides, tmp_path)
    (cache,) = (tmp_path / "cache" / "neft").iterdir()
    scores_time = (cache / "scores.safetensors").stat().st_mtime_ns
    for extra in (
        ["selection.budget.value=0.03"],
        ["strategy=reverse_selection"],
        ["selection=cosine_plus_reverse"],
        ["selection.budget.kind=lora_rank", "selection.budget.value=2"],
    ):
        run(compose(tiny_overrides + FAST + ["strategy=neft", *extra]))
    assert [p.name for p in (tmp_path / "cache" / "neft").iterdir()] == [cache.name]  # one reference, reused
    assert (cache / "scores.safetensors").stat().st_mtime_ns == scores_time
    run(compose(tiny_overrides + FAST + ["strategy=neft", "selection.reference.steps=10"]))
    assert len(list((tmp_path / "cache" / "neft").iterdir())) == 2  # another K is another reference


def test_random_needs_no_reference(tiny_overrides, tmp_path):
    run_dir = _neft(tiny_overrides, tmp_path, "strategy=random_neuron")
    assert not (tmp_path / "cache" / "neft").exists()
    assert read_metrics(run_dir)["selection"] == "random"


def test_transfer_and_union_from_files(tiny_overrides, tmp_path):
    first = _neft(tiny_overrides, tmp_path)
    set_file = tmp_path / "cosine_set.safetensors"
    (first / "neuron_set.safetensors").rename(set_file)
    (first / "neuron_set.json").rename(tmp_path / "cosine_set.json")
    other = NeuronSet.load(set_file)
    random_set = tmp_path / "random_set"
    NeuronSet(other.space, {"up.0": torch.arange(40)}, meta={"method": "hand"}).save(random_set)
    run(
        compose(
            tiny_overrides
            + FAST
            + ["strategy=neft", "selection=from_file", f"selection.file={set_file}", "seed=1"]
        )
    )
    assert read_metrics(tmp_path / "run")["neuron_vectors"] == other.num_vectors
    run(
        compose(
            tiny_overrides
            + FAST
            + ["strategy=neft", "selection=union", f"selection.files=[{set_file},{random_set}.safetensors]"]
        )
    )
    union = NeuronSet.load(tmp_path / "run" / "neuron_set.safetensors")
    assert union.num_vectors == other.union(NeuronSet.load(f"{random_set}.safetensors")).num_vectors


def test_neuron_set_of_another_model_is_refused(tiny_overrides, tmp_path):
    model, _ = build_tiny_model("llama", intermediate_size=96)
    from neft_lab.neurons.geometry import NeuronSpace

    foreign = NeuronSet(
        NeuronSpace.from_model(model), {"up.0": torch.arange(5)}, meta={"model": {"name": "tiny96"}}
    )
    foreign.save(tmp_path / "foreign")
    with pytest.raises(ConfigError, match="chosen for tiny96 .*select neurons for this model"):
        run(
            compose(
                tiny_overrides
                + FAST
                + [
                    "strategy=neft",
                    "selection=from_file",
                    f"selection.file={tmp_path / 'foreign.safetensors'}",
                ]
            )
        )
    with pytest.raises(ConfigError, match="strategy=neft needs a neuron selection"):
        run(compose(tiny_overrides + FAST[:2] + ["strategy=neft", "selection=none"]))
    with pytest.raises(ConfigError, match="more than the"):
        run(compose(tiny_overrides + FAST + ["strategy=random_neuron", "selection.budget.value=0.5"]))


@pytest.mark.fault
def test_concurrent_jobs_share_one_reference(tmp_path):
    """Two jobs of a sweep start together: one runs the reference, the other waits and reuses it."""
    args = [
        sys.executable,
        "-m",
        "neft_lab",
        "experiment=smoke",
        "strategy=neft",
        "logger=none",
        *FAST,
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    jobs = [
        subprocess.Popen(
            [*args, f"selection.budget.value={v}", f"paths.output_dir={tmp_path / str(v)}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v in (0.03, 0.06)
    ]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs[0][-2000:] + outputs[1][-2000:]
    assert sum("reference run: full fine-tuning" in out for out in outputs) == 1
    (cache,) = (tmp_path / "cache" / "neft").iterdir()
    assert (cache / "scores.safetensors").exists() and not list(cache.glob(".*.tmp"))


@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_neft_with_gradient_checkpointing_and_bf16(tiny_overrides, tmp_path, impl):
    run_dir = _neft(
        tiny_overrides,
        tmp_path,
        "strategy=random_neuron",
        f"strategy.impl={impl}",
        "model.gradient_checkpointing=true",
        "trainer.precision=bf16-mixed",
    )
    metrics = read_metrics(run_dir)
    assert metrics["impl"] == impl and metrics["train"]["steps"] == 30
    assert metrics["train"]["best_val_loss"] < 6.0  # finite, and below a random model's ln(512) ≈ 6.24
