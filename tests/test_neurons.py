"""Neuron space, scoring, selection and neuron-set files, on hand-made base/reference pairs."""

from __future__ import annotations

import pytest
import torch

from neft_lab.errors import ConfigError
from neft_lab.models.loading import parameter_count
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.neurons.scoring import WeightSource, cosine_scores
from neft_lab.neurons.selection import Budget, lora_parameter_count, select


@pytest.fixture
def pair():
    """A tiny llama and a copy in which chosen vectors were rotated by known amounts."""
    base, _ = build_tiny_model("llama")
    reference, _ = build_tiny_model("llama")
    moved = {"up.0": [5, 17], "down.1": [3], "up.1": [100]}
    with torch.no_grad():
        up0 = reference.model.layers[0].mlp.up_proj.weight
        up0[5] = -up0[5]  # cosine -1: the most moved
        up0[17] = up0[17] + 0.8 * up0[17].norm() * torch.randn_like(up0[17]) / up0[17].norm()
        down1 = reference.model.layers[1].mlp.down_proj.weight
        down1[:, 3] = torch.randn_like(down1[:, 3])  # ~orthogonal
        up1 = reference.model.layers[1].mlp.up_proj.weight
        up1[100] = up1[100] + 0.3 * torch.randn_like(up1[100]) * up1[100].abs().mean()
    return base, reference, moved


def test_space_geometry_per_family():
    for arch in ("llama", "gemma3", "gpt2"):
        model, _ = build_tiny_model(arch)
        space = NeuronSpace.from_model(model)
        assert [g.name for g in space.groups] == ["up.0", "down.0", "up.1", "down.1"]
        assert space.num_vectors == 4 * 128 and all(g.length == 64 for g in space.groups)
        assert {g.kind: g.linear_axis for g in space.groups} == {"up": 0, "down": 1}
    gpt2 = NeuronSpace.from_model(build_tiny_model("gpt2")[0])
    assert gpt2.group("up.0").transposed and gpt2.group("up.0").axis == 1  # Conv1D stores [in, out]
    with_gate = NeuronSpace.from_model(build_tiny_model("llama")[0], ["up", "down", "gate", "q", "o"])
    assert with_gate.num_vectors == 2 * (3 * 128 + 64 + 64)


def test_unsupported_architecture_and_kind():
    with pytest.raises(
        ConfigError, match="does not know where the MLP neurons of 'bert'.*Supported: .*llama"
    ):
        NeuronSpace.from_shapes("bert", {"x.weight": (4, 4)})
    with pytest.raises(ConfigError, match=r"\['gate'\] are not available for gpt2"):
        NeuronSpace.from_model(build_tiny_model("gpt2")[0], ["up", "gate"])


def test_cosine_scores_find_the_moved_vectors(pair):
    base, reference, moved = pair
    space = NeuronSpace.from_model(base)
    scores = cosine_scores(WeightSource(base), WeightSource(reference), space, progress=False)
    assert scores["up.0"][5].item() == pytest.approx(-1.0, abs=1e-6)
    untouched = [
        v for name, s in scores.items() for i, v in enumerate(s.tolist()) if i not in moved.get(name, [])
    ]
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in untouched)
    budget = 3 * 64  # three vectors
    chosen = select(scores, space, budget, "cosine")
    assert {n: i.tolist() for n, i in chosen.indices.items()} == {"up.0": [5, 17], "down.1": [3]}
    assert chosen.num_parameters == budget
    reverse = select(scores, space, budget, "reverse")
    assert not set(reverse.indices.get("up.0", torch.tensor([])).tolist()) & {5, 17}
    assert "down.1" not in reverse.indices or 3 not in reverse.indices["down.1"].tolist()


def test_scores_read_from_disk_equal_in_memory(pair, tmp_path):
    base, reference, _ = pair
    reference.save_pretrained(tmp_path / "ref")
    base.save_pretrained(tmp_path / "base")
    space = NeuronSpace.from_model(base)
    disk = cosine_scores(
        WeightSource(tmp_path / "base"), WeightSource(tmp_path / "ref"), space, progress=False
    )
    memory = cosine_scores(WeightSource(base), WeightSource(reference), space, progress=False)
    for name in memory:
        torch.testing.assert_close(disk[name], memory[name])


def test_reference_of_another_architecture_or_broken_is_rejected(pair, tmp_path):
    base, reference, _ = pair
    space = NeuronSpace.from_model(base)
    other, _ = build_tiny_model("llama", intermediate_size=96)
    with pytest.raises(ConfigError, match=r"is \[96, 64\] in the reference .* another architecture"):
        cosine_scores(WeightSource(base), WeightSource(other), space, progress=False)
    with pytest.raises(ConfigError, match="is a gpt2 model but the base is llama"):
        cosine_scores(WeightSource(base), WeightSource(build_tiny_model("gpt2")[0]), space, progress=False)
    with torch.no_grad():
        reference.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="contains NaN or inf"):
        cosine_scores(WeightSource(base), WeightSource(reference), space, progress=False)


def test_budget_is_met_exactly_and_checked():
    model, _ = build_tiny_model("llama")
    space, total = NeuronSpace.from_model(model), parameter_count(model)
    scores = {
        g.name: torch.rand(g.count, generator=torch.Generator().manual_seed(i))
        for i, g in enumerate(space.groups)
    }
    params = Budget("share", 0.09).parameters(space, total, model)
    assert params == round(0.09 * total)
    chosen = select(scores, space, params, "cosine")
    assert chosen.num_vectors == params // 64 and chosen.num_parameters == (params // 64) * 64
    flat = torch.cat([scores[g.name] for g in space.groups])
    picked = torch.cat([scores[n][i] for n, i in chosen.indices.items()])
    assert picked.max() <= flat.sort().values[chosen.num_vectors - 1]  # exactly the lowest
    assert Budget("vectors", 10).parameters(space, total) == 640
    lora8 = lora_parameter_count(model, 8)
    assert lora8 == 8 * sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    assert Budget("lora_rank", 8).parameters(space, total, model) == lora8
    for bad, message in [
        (Budget("share", 0), "must be > 0"),
        (Budget("share", 9), "above 1"),
        (Budget("share", 0.9), "more than the"),
        (Budget("weird", 1), "unknown budget kind"),
    ]:
        with pytest.raises(ConfigError, match=message):
            bad.parameters(space, total, model)


def test_random_is_seeded_and_differs_from_cosine():
    model, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(model)
    scores = {g.name: torch.linspace(0, 1, g.count) for g in space.groups}
    a = select(scores, space, 50 * 64, "random", seed=1)
    b = select(scores, space, 50 * 64, "random", seed=1)
    c = select(scores, space, 50 * 64, "random", seed=2)
    cos = select(scores, space, 50 * 64, "cosine")
    assert a.num_vectors == 50 and {k: v.tolist() for k, v in a.indices.items()} == {
        k: v.tolist() for k, v in b.indices.items()
    }
    assert a.overlap(c) < 0.9 and a.overlap(cos) < 0.9


def test_cosine_plus_reverse_and_per_layer():
    model, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(model)
    scores = {
        g.name: torch.rand(g.count, generator=torch.Generator().manual_seed(i))
        for i, g in enumerate(space.groups)
    }
    mixed = select(scores, space, 20 * 64, "cosine_plus_reverse", reverse_parameters=10 * 64)
    low, high = select(scores, space, 20 * 64, "cosine"), select(scores, space, 10 * 64, "reverse")
    assert mixed.num_vectors == 30 and mixed.overlap(low.union(high)) == 1.0
    per_layer = select(scores, space, 41 * 64, "cosine", pooling="per_layer")
    counts = per_layer.per_layer()
    by_layer = [counts["up"].get(layer, 0) + counts["down"].get(layer, 0) for layer in (0, 1)]
    assert sum(by_layer) == 41 and abs(by_layer[0] - by_layer[1]) <= 1


def test_union_intersection_counts():
    space = NeuronSpace.from_model(build_tiny_model("llama")[0])
    a = NeuronSet(space, {"up.0": torch.tensor([1, 2, 3]), "down.1": torch.tensor([7])})
    b = NeuronSet(space, {"up.0": torch.tensor([3, 4]), "up.1": torch.tensor([0])})
    assert a.union(b).num_vectors == 6 and a.intersection(b).num_vectors == 1
    assert a.intersection(b).indices == {"up.0": torch.tensor([3])}
    assert a.overlap(b) == pytest.approx(1 / 4)


def test_neuron_set_file_round_trip_and_model_check(tmp_path):
    model, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(model)
    scores = {g.name: torch.rand(g.count) for g in space.groups}
    chosen = select(scores, space, 30 * 64, "cosine", meta={"task": "t", "reference_steps": 50})
    path = chosen.save(tmp_path / "set")
    assert path.exists() and (tmp_path / "set.json").exists()
    loaded = NeuronSet.load(path)
    assert {k: v.tolist() for k, v in loaded.indices.items()} == {
        k: v.tolist() for k, v in chosen.indices.items()
    }
    torch.testing.assert_close(loaded.scores["up.1"], scores["up.1"])
    assert loaded.meta["reference_steps"] == 50 and loaded.per_layer() == chosen.per_layer()
    loaded.check_same_space(NeuronSpace.from_model(build_tiny_model("llama", seed=3)[0]))  # same shapes: fits
    with pytest.raises(ConfigError, match="chosen for .*select neurons for this model"):
        loaded.check_same_space(NeuronSpace.from_model(build_tiny_model("llama", intermediate_size=96)[0]))
    with pytest.raises(ConfigError, match="does not exist"):
        NeuronSet.load(tmp_path / "missing.safetensors")
