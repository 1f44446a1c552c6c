"""Scorers without a full fine-tune: gradient (empirical Fisher), activation ridge probe, LoRA reference (the paper's
probe: tests/test_probe.py)."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.losses import target_token_loss
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons import scorers
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.scorers import activation_ridge, gradient, lora_reference, probe
from neft_lab.neurons.scorers.activation_ridge import activation_ridge_scores, fit_ridge_probe
from neft_lab.neurons.scorers.gradient import gradient_scores, vector_sq_norms
from neft_lab.neurons.scorers.lora_reference import LoraWeights, lora_reference_scores
from neft_lab.neurons.scoring import WeightSource, cosine_scores


def make_batches(
    count: int = 3, rows: int = 3, width: int = 12, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches with a prompt (no loss) and right padding on one row, as the collator makes them."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, 400, (rows, width), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, width - 3 :] = 0
        labels = ids.clone()
        labels[:, :5] = -100
        labels[mask == 0] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def dense_fisher(model: nn.Module, batches, space: NeuronSpace) -> dict[str, torch.Tensor]:
    """The ordinary way: autograd's dense weight gradient per batch, squared per vector, averaged over batches."""
    model.requires_grad_(True).eval()
    total = {g.name: torch.zeros(g.count) for g in space.groups}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        target_token_loss(model, batch)[0].backward()
        for g in space.groups:
            total[g.name] += model.get_parameter(g.weight).grad.square().sum(dim=1 - g.axis)
    model.zero_grad(set_to_none=True)
    return {name: value / len(batches) for name, value in total.items()}


# ---------------------------------------------------------------------------------------------
# gradient


@pytest.mark.parametrize("form", ["outer", "gram"])
@pytest.mark.parametrize("linear_axis", [0, 1])
@pytest.mark.parametrize("per_example", [False, True])
def test_vector_sq_norms_equal_the_norms_of_the_outer_product(form, linear_axis, per_example):
    generator = torch.Generator().manual_seed(0)
    x, gy = torch.randn(3, 5, 7, generator=generator), torch.randn(3, 5, 11, generator=generator)
    weights = torch.tensor([1.0, 0.5, 2.0]) if per_example else None
    got = vector_sq_norms(x, gy, linear_axis, weights, form=form, chunk_elements=20)  # several chunks
    if per_example:
        grads = torch.einsum("bto,bti->boi", gy, x)  # one [out, in] gradient per example
        want = (grads.square().sum(dim=2 - linear_axis) * weights[:, None]).sum(0)
    else:
        want = (gy.reshape(-1, 11).T @ x.reshape(-1, 7)).square().sum(dim=1 - linear_axis)
    assert got.shape == (11 if linear_axis == 0 else 7,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_gradient_scores_equal_the_dense_gradients_squared_per_vector(arch):
    """The per-vector statistic = autograd's dense .grad, squared per row/column, averaged over batches."""
    model, _ = build_tiny_model(arch)
    space = NeuronSpace.from_model(model, ["up", "down", "q", "o"] if arch == "llama" else ["up", "down"])
    batches = make_batches()
    scores = gradient_scores(model, batches, space, progress=False)
    want = dense_fisher(model, batches, space)
    assert scores.keys() == want.keys()
    for name in want:
        assert scores[name].shape == (space.group(name).count,) and scores[name].dtype == torch.float32
        torch.testing.assert_close(scores[name], want[name], rtol=1e-4, atol=1e-10)


def test_per_example_fisher_is_the_mean_of_each_examples_own_squared_gradient():
    model, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(model)
    batches = make_batches(count=2)
    scores = gradient_scores(model, batches, space, per_example=True, progress=False)
    one_by_one = [{k: v[row : row + 1] for k, v in b.items()} for b in batches for row in range(3)]
    want = dense_fisher(model, one_by_one, space)  # each example alone: its own mean loss
    for name in want:
        torch.testing.assert_close(scores[name], want[name], rtol=1e-4, atol=1e-10)


def test_gradient_scorer_ranks_the_vectors_with_the_largest_gradient_first():
    """Scaling down column 37 of layer 0 by 30 scales the gradient of up row 37 by 30 (the up unit's
    output gradient flows through that column); scaling up row 81 of layer 1 scales unit 81's
    activation, hence the gradient of down column 81. Those two vectors must lead the whole ranking.
    (At transformers' small init, 0.02, where the other vectors' gradients are of one size.)"""
    model, _ = build_tiny_model("llama", init_std=0.02)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 37] *= 30
        model.model.layers[1].mlp.up_proj.weight[81] *= 30
    scores = gradient_scores(model, make_batches(count=2, rows=4, width=16), progress=False)
    assert int(scores["up.0"].argmax()) == 37 and int(scores["down.1"].argmax()) == 81
    ranked = sorted(
        ((float(v), name, i) for name, s in scores.items() for i, v in enumerate(s)), reverse=True
    )
    assert {(name, i) for _, name, i in ranked[:2]} == {("up.0", 37), ("down.1", 81)}
    assert ranked[1][0] > 20 * ranked[2][0]


def test_gradient_scoring_leaves_the_model_as_it_was():
    model, _ = build_tiny_model("llama")
    model.train()
    for name, param in model.named_parameters():  # a mix, restored exactly
        param.requires_grad_("layers.1" in name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    gradient_scores(model, make_batches(), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())
    model.requires_grad_(False)  # all frozen (the common case when scoring) works the same
    gradient_scores(model, make_batches(count=1), progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_scores_take_any_iterable_skip_batches_without_targets_and_stop_at_max_batches():
    model, _ = build_tiny_model("llama")
    batches = make_batches(count=4)
    no_target = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
    stream = iter([no_target, *batches])  # a generator has no len(): tqdm gets total=None
    got = gradient_scores(model, stream, max_batches=2, progress=False)
    want = gradient_scores(model, batches[:2], progress=False)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.bad_input
def test_gradient_scoring_refuses_what_a_user_can_fix():
    model, _ = build_tiny_model("llama")
    with pytest.raises(ConfigError, match="no batch with target tokens.*empty"):
        gradient_scores(model, [], progress=False)
    empty = {k: v for k, v in make_batches(count=1)[0].items()}
    empty["labels"] = torch.full_like(empty["labels"], -100)
    with pytest.raises(ConfigError, match="1 batches had none: every label is -100"):
        gradient_scores(model, [empty], progress=False)
    with pytest.raises(ConfigError, match=r"batch 0 lacks \['labels'\]"):
        gradient_scores(model, [{"input_ids": empty["input_ids"], "attention_mask": empty["attention_mask"]}])
    with pytest.raises(ConfigError, match="max_batches=0"):
        gradient_scores(model, make_batches(), max_batches=0)
    no_mlp = nn.Sequential(nn.Linear(4, 4))
    no_mlp.config = SimpleNamespace(model_type="llama")
    with pytest.raises(ConfigError, match="found no up/down weights"):
        gradient_scores(no_mlp, make_batches())
    other, _ = build_tiny_model("llama", num_layers=3)
    with pytest.raises(ConfigError, match="no module model.layers.2.mlp.up_proj"):
        gradient_scores(model, make_batches(), NeuronSpace.from_model(other), progress=False)
    assert all(p.grad is None for p in model.parameters())  # failures leave no trace either
    assert not any(m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------
# activation ridge probe (scorer=activation_ridge, formerly `probe`)


@pytest.mark.parametrize("classes", [2, 3])
def test_ridge_probe_puts_its_largest_weights_on_the_informative_features(classes):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(150) % classes
    features = torch.randn(150, 400, generator=generator)  # more features than examples: the dual side
    informative = [11, 222, 333][:classes]
    for c, column in enumerate(informative):
        features[:, column] = 5 * (labels == c) + torch.randn(150, generator=generator)
    features[:, 5] = 7.0  # a constant unit gets weight 0
    fitted = fit_ridge_probe(features * 1000, labels)  # standardised: the scale of a unit does not matter
    scores = fitted.unit_scores()
    assert set(scores.topk(classes).indices.tolist()) == set(informative)
    assert float(scores[5]) == 0.0
    assert fitted.loo_accuracy > 0.95 and fitted.classes == tuple(range(classes))
    assert fitted.weights.shape == (400, 1 if classes == 2 else classes)


def planted_probe_task(
    model: nn.Module, tokenizer, planted: dict[int, list[int]]
) -> tuple[list[str], list[int]]:
    """Texts whose label is a marker word (" cat" = 1, " dog" = 0) amid random filler, and a model where
    only the `planted` MLP units (layer → units) can see the marker.

    The markers' embeddings differ only in the sign of hidden coordinate 0; every attention and MLP
    input matrix ignores that coordinate and nothing writes to it, except the planted units, whose
    gate and up rows read it alone (silu(8)·8 on " cat", ≈0 on " dog"). RMSNorm sees the same norm for
    both markers, so every other unit's activations are exactly label-independent."""
    marks = {1: " cat", 0: " dog"}
    filler = [" the", " red", " blue", " car", " ball", " never", " watches", " a"]
    marker_ids = {c: tokenizer(w, add_special_tokens=False)["input_ids"] for c, w in marks.items()}
    assert all(len(ids) == 1 for ids in marker_ids.values())
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 0] = 0
        embeddings[marker_ids[1][0], 0], embeddings[marker_ids[0][0], 0] = 1.0, -1.0
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                linear.weight[:, 0] = 0
            attention.o_proj.weight[0, :] = 0
            mlp.down_proj.weight[0, :] = 0
            for unit in planted.get(index, []):
                for linear in (mlp.gate_proj, mlp.up_proj):
                    linear.weight[unit] = 0
                    linear.weight[unit, 0] = 1.0
                mlp.down_proj.weight[:, unit] = 0
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(120):
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), marks[i % 2])
        texts.append("".join(words))
        labels.append(i % 2)
    return texts, labels


def test_probe_recovers_the_planted_informative_neurons():
    model, tokenizer = build_tiny_model("llama")
    planted = {0: [7, 90], 1: [33]}
    texts, labels = planted_probe_task(model, tokenizer, planted)
    space = NeuronSpace.from_model(model, ["up", "gate", "down"])
    model.train()
    scores = activation_ridge_scores(model, tokenizer, texts, labels, space, batch_size=32, progress=False)
    assert scores.keys() == {g.name for g in space.groups}
    for layer in planted:
        for kind in ("up", "gate", "down"):  # a neuron's score goes to all its vectors
            assert torch.equal(scores[f"{kind}.{layer}"], scores[f"up.{layer}"])
    flat = torch.cat([scores["up.0"], scores["up.1"]])
    top = set(flat.topk(3).indices.tolist())
    assert top == {7, 90, 128 + 33}
    others = flat[[i for i in range(256) if i not in top]]
    assert float(flat[list(top)].min()) > 3 * float(others.max())
    assert model.training and not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.bad_input
def test_probe_refuses_what_a_user_can_fix():
    model, tokenizer = build_tiny_model("llama")
    with pytest.raises(ConfigError, match="needs at least two classes"):
        activation_ridge_scores(model, tokenizer, ["a cat", "a dog"], [1, 1], progress=False)
    with pytest.raises(ConfigError, match="2 texts but 3 labels"):
        activation_ridge_scores(model, tokenizer, ["a cat", "a dog"], [1, 0, 1], progress=False)
    with pytest.raises(ConfigError, match="got no texts"):
        activation_ridge_scores(model, tokenizer, [], [], progress=False)
    with pytest.raises(ConfigError, match="group q.0 .* is not one of"):
        activation_ridge_scores(
            model, tokenizer, ["a cat", "a dog"], [1, 0], NeuronSpace.from_model(model, ["q"])
        )
    with pytest.raises(ConfigError, match="ridge penalty must be > 0"):
        fit_ridge_probe(torch.randn(4, 3), [0, 1, 0, 1], alpha=0)
    no_mlp = nn.Sequential(nn.Linear(4, 4))
    no_mlp.config = SimpleNamespace(model_type="llama")
    with pytest.raises(ConfigError, match="found no down weights"):
        activation_ridge_scores(no_mlp, tokenizer, ["a cat", "a dog"], [1, 0], NeuronSpace.from_model(model))


# ---------------------------------------------------------------------------------------------
# lora_reference


def planted_lora(model: nn.Module, rows: list[int], columns: list[int]):
    """A PEFT LoRA (all linear layers) whose B·A is zero except on `rows` of up_proj.0 and `columns` of
    down_proj.1; those vectors move by a large, known amount and every other by a small random one."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(1e-3 * torch.randn(param.shape, generator=generator))
        up = peft_model.get_base_model().model.layers[0].mlp.up_proj
        up.lora_A["default"].weight.copy_(
            0.1 * torch.randn(up.lora_A["default"].weight.shape, generator=generator)
        )
        up.lora_B["default"].weight[rows] = 0.5  # rows of the [128, 64] delta B·A
        down = peft_model.get_base_model().model.layers[1].mlp.down_proj
        down.lora_A["default"].weight[:, columns] = 0.5  # columns of the [64, 128] delta B·A
        down.lora_B["default"].weight.fill_(0.3)
    return peft_model


def test_lora_reference_gives_the_lowest_cosine_to_the_vectors_lora_moved_most(tmp_path):
    model, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(model)
    base_weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    rows, columns = [5, 17, 99], [9, 40]
    peft_model = planted_lora(model, rows, columns)
    frozen = {n: p.clone() for n, p in peft_model.named_parameters()}

    scores = lora_reference_scores(peft_model, peft_model, space, progress=False)
    assert set(scores["up.0"].topk(3, largest=False).indices.tolist()) == set(rows)
    assert set(scores["down.1"].topk(2, largest=False).indices.tolist()) == set(columns)
    assert float(scores["up.0"][rows].max()) < float(scores["up.0"].median()) - 0.1
    assert scores["down.0"].min() > 0.99  # only small random moves elsewhere

    # the same numbers as PEFT's own merge on a copy, and nothing written into the PEFT model or its base
    merged = copy.deepcopy(peft_model).merge_and_unload()
    oracle = cosine_scores(WeightSource(build_tiny_model("llama")[0]), WeightSource(merged), space, False)
    for name in oracle:
        torch.testing.assert_close(scores[name], oracle[name], rtol=0, atol=1e-6)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters())
    base_of = LoraWeights(peft_model, merge=False)
    assert all(torch.equal(base_of.get(n), base_weights[n]) for n in base_weights)

    # a merged folder (merge_on_export) and the base folder score the same
    merged.save_pretrained(tmp_path / "merged")
    build_tiny_model("llama")[0].save_pretrained(tmp_path / "base")
    from_disk = lora_reference_scores(tmp_path / "base", tmp_path / "merged", progress=False)
    for name in oracle:
        torch.testing.assert_close(from_disk[name], oracle[name], rtol=0, atol=1e-6)


def test_lora_weights_read_an_already_merged_adapter_back_as_base_and_merged():
    model, _ = build_tiny_model("llama")
    peft_model = planted_lora(model, [3], [4])
    unmerged = lora_reference_scores(peft_model, peft_model, progress=False)
    peft_model.merge_adapter()  # base_layer now holds W + B·A
    merged = lora_reference_scores(peft_model, peft_model, progress=False)
    for name in unmerged:
        torch.testing.assert_close(merged[name], unmerged[name], rtol=0, atol=1e-6)


@pytest.mark.bad_input
def test_lora_reference_refuses_a_lora_that_trains_no_scored_matrix():
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="trains none of the scored matrices.*all-linear"):
        lora_reference_scores(peft_model, peft_model, progress=False)


# ---------------------------------------------------------------------------------------------
# package


def test_each_scorer_states_its_direction():
    assert scorers.higher_is_selected("gradient") is gradient.HIGHER_IS_SELECTED is True
    assert scorers.higher_is_selected("probe") is probe.HIGHER_IS_SELECTED is True
    assert scorers.higher_is_selected("activation_ridge") is activation_ridge.HIGHER_IS_SELECTED is True
    assert scorers.higher_is_selected("lora_reference") is lora_reference.HIGHER_IS_SELECTED is False
    assert scorers.higher_is_selected("cosine") is False
    with pytest.raises(ConfigError, match="unknown scorer 'fisher'"):
        scorers.higher_is_selected("fisher")


def test_importing_the_scorers_does_not_import_the_pipeline():
    code = (
        "import sys, neft_lab.neurons.scorers.gradient, neft_lab.neurons.scorers.probe, neft_lab.neurons.scorers.activation_ridge, "
        "neft_lab.neurons.scorers.lora_reference; "
        "assert 'neft_lab.pipeline' not in sys.modules and 'neft_lab.strategies' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
