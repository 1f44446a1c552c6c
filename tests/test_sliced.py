"""Neuron-sliced training layers: exact equivalence to masked dense training, frozen weights stay
bit-identical, compact gradients, export round trips, autocast / checkpointing / bf16, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.sliced import (
    IMPLS,
    SlicedLinear,
    SlicePlan,
    apply_delta,
    attach,
    delta_state,
    linear_weight,
    merge,
    sync,
    sync_after_step,
    trainable_slices,
)
from sliced_helpers import (
    ARCHS,
    MLP,
    assert_only_slices_moved,
    batch,
    fresh,
    grad_a,
    loss_of,
    make_plans,
    slice_mask,
    tiny_base_models,
    train_dense_reference,
    train_sliced,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_models() -> dict[str, nn.Module]:
    return tiny_base_models()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_sliced_training_equals_masked_dense_training(base_models, arch, impl):
    plans = make_plans(arch)
    reference = fresh(base_models, arch, torch.float64)
    train_dense_reference(reference, plans, steps=4, lr=0.5, momentum=0.9)

    model = fresh(base_models, arch, torch.float64)
    attach(model, plans, impl=impl)
    train_sliced(model, steps=4, lr=0.5, momentum=0.9)
    merge(model)

    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-6
    base = base_models[arch].state_dict()
    assert any(not torch.equal(got[k], base[k].double()) for k in got)  # training did something


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_adamw_weight_decay_leaves_unselected_entries_bit_identical(base_models, arch, impl):
    plans = make_plans(arch)
    model = fresh(base_models, arch)
    attach(model, plans, impl=impl)
    train_sliced(model, steps=3, optimizer_cls=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    merge(model)
    assert not any(isinstance(m, SlicedLinear) for m in model.modules())

    assert_only_slices_moved(model, base_models[arch], plans)


def test_masked_with_weight_decay_moves_unselected_entries(base_models):
    """Why we do not train the authors' way: decoupled decay touches the non-selected weights."""
    plans = make_plans("llama")
    model = fresh(base_models, "llama")
    attach(model, plans, impl="masked")
    train_sliced(model, steps=2, optimizer_cls=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    merge(model)
    plan = plans[0]
    trained_a = linear_weight(model.get_submodule(plan.module))
    base_a = linear_weight(base_models["llama"].get_submodule(plan.module))
    mask = slice_mask(base_a, plan)
    assert not torch.equal(trained_a[~mask], base_a[~mask])


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_keeps_gradients_and_optimizer_state_to_the_slices(base_models, arch):
    plans = make_plans(arch, k=7)
    model = fresh(base_models, arch)
    attach(model, plans, impl="fused")
    vector_len = 64  # hidden size: up rows and down columns both have d_model entries
    expected = sum(p.indices.numel() for p in plans) * vector_len
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected
    assert sum(p.numel() for _, p in trainable_slices(model)) == expected

    optimizer = torch.optim.AdamW([p for _, p in trainable_slices(model)], lr=1e-3)
    loss_of(model, batch()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.shape == param.shape, name
        else:
            assert param.grad is None, name
    optimizer.step()
    state_numel = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.ndim > 0)
    assert state_numel == 2 * expected  # exp_avg and exp_avg_sq, nothing dense


@pytest.mark.parametrize("impl", ["fused", "delta"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_save_load_and_delta_round_trip(base_models, arch, impl, tmp_path):
    model = fresh(base_models, arch)
    attach(model, make_plans(arch), impl=impl)
    train_sliced(model, steps=3, optimizer_cls=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    ids = batch(seed=99)
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
    delta = delta_state(model)
    assert {k.rsplit(".", 1)[1] for k in delta} == {"indices", "vectors", "axis"}
    assert delta[f"{MLP[arch][0].format(l=0)}.vectors"].shape == (20, 64)  # rows [k, in]
    assert delta[f"{MLP[arch][1].format(l=0)}.vectors"].shape == (64, 20)  # columns [out, k]

    merge(model)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(base_models[arch].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained_logits, rtol=0, atol=1e-5)

    plain = fresh(base_models, arch)
    apply_delta(plain, delta)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, trained_logits, rtol=0, atol=1e-5)
    for name, tensor in plain.state_dict().items():  # the applied delta is exactly the merged model
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_apply_delta_rejects_models_that_do_not_fit(base_models):
    model = fresh(base_models, "llama")
    attach(model, make_plans("llama"), impl="fused")
    delta = delta_state(model)

    other, _ = build_tiny_model("llama", hidden_size=32)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*does not fit.*\(128, 32\)"):
        apply_delta(other, delta)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched

    shallow, _ = build_tiny_model("llama", num_layers=1)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp.*does not have"):
        apply_delta(shallow, delta)
    with pytest.raises(ValueError, match="merge first"):
        apply_delta(model, delta)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_with_gradient_checkpointing_matches_plain_gradients(base_models, arch):
    plans = make_plans(arch)
    grads = []
    for checkpointing in (False, True):
        model = fresh(base_models, arch)
        model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF checkpoints only in training mode
        attach(model, plans, impl="fused")
        loss = loss_of(model, batch())
        assert torch.isfinite(loss)
        loss.backward()
        grads.append([p.grad.clone() for _, p in trainable_slices(model)])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_fused_under_cpu_autocast_bf16(base_models):
    plans = make_plans("llama")
    reference = fresh(base_models, "llama")
    reference.requires_grad_(False)
    for plan in plans:
        reference.get_submodule(plan.module).weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_of(reference, batch()).backward()

    model = fresh(base_models, "llama")
    attach(model, plans, impl="fused")
    before = [p.detach().clone() for _, p in trainable_slices(model)]
    optimizer = torch.optim.AdamW([p for _, p in trainable_slices(model)], lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, batch())
    assert torch.isfinite(loss)
    loss.backward()
    for (name, param), plan in zip(trainable_slices(model), plans):
        assert param.grad.dtype == torch.float32, name
        dense = reference.get_submodule(plan.module).weight.grad.index_select(plan.axis, plan.indices)
        assert F.cosine_similarity(param.grad.flatten(), dense.flatten(), dim=0) > 0.99, name
    optimizer.step()
    sync(model)
    for (_, param), old in zip(trainable_slices(model), before):
        assert not torch.equal(param, old)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(loss_of(model, batch()))


@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_bf16_model_trains(base_models, impl):
    model = fresh(base_models, "llama", torch.bfloat16)
    plans = make_plans("llama")
    attach(model, plans, impl=impl)
    assert all(p.dtype == torch.bfloat16 for _, p in trainable_slices(model))
    train_sliced(model, steps=2, optimizer_cls=torch.optim.AdamW, lr=1e-2)
    assert torch.isfinite(loss_of(model, batch()))
    merge(model)
    up = linear_weight(model.get_submodule(plans[0].module))
    base_up = linear_weight(base_models["llama"].get_submodule(plans[0].module)).to(torch.bfloat16)
    mask = slice_mask(base_up, plans[0])
    assert torch.equal(up[~mask], base_up[~mask]) and not torch.equal(up[mask], base_up[mask])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_zeroes_gradients_outside_the_slice(base_models, arch):
    plans = make_plans(arch)
    model = fresh(base_models, arch)
    attach(model, plans, impl="masked")
    loss_of(model, batch()).backward()
    for plan in plans:
        grad = grad_a(model.get_submodule(plan.module).base)
        mask = slice_mask(grad, plan)
        assert torch.count_nonzero(grad[~mask]) == 0
        assert torch.count_nonzero(grad[mask]) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in trainable_slices(model)}


def test_fused_syncs_lazily_after_a_step_and_after_loading(base_models):
    """A forgotten `sync` must not silently train on stale weights."""
    model = fresh(base_models, "llama")
    attach(model, make_plans("llama"), impl="fused")
    optimizer = torch.optim.SGD([p for _, p in trainable_slices(model)], lr=1.0)
    loss_of(model, batch()).backward()
    optimizer.step()  # no sync
    ids = batch(seed=5)
    with torch.no_grad():
        lazy = model(input_ids=ids).logits
        sync(model)
        torch.testing.assert_close(model(input_ids=ids).logits, lazy, rtol=0, atol=0)

    saved = copy.deepcopy(model.state_dict())
    restored = fresh(base_models, "llama")
    attach(restored, make_plans("llama"), impl="fused")
    restored.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, lazy, rtol=0, atol=0)


def test_sync_after_step_hook(base_models):
    model = fresh(base_models, "llama")
    plans = make_plans("llama")
    attach(model, plans, impl="fused")
    optimizer = torch.optim.SGD([p for _, p in trainable_slices(model)], lr=1.0)
    sync_after_step(optimizer, model)
    loss_of(model, batch()).backward()
    optimizer.step()
    wrapper = model.get_submodule(plans[0].module)
    assert torch.equal(wrapper.weight_a.index_select(0, wrapper.indices), wrapper.vectors)


def test_bad_inputs_raise_clear_errors(base_models):
    model = fresh(base_models, "llama")
    good = make_plans("llama")
    with pytest.raises(ValueError, match=r"no module named 'model\.layers\.9\.mlp\.up_proj'.*up_proj"):
        attach(model, [SlicePlan("model.layers.9.mlp.up_proj", 0, torch.tensor([1]))])
    with pytest.raises(ValueError, match="not nn.Linear or Conv1D"):
        attach(model, [SlicePlan("model.layers.0.mlp", 0, torch.tensor([1]))])
    with pytest.raises(ValueError, match=r"index 128 out of range.*128 rows"):
        attach(model, [SlicePlan("model.layers.0.mlp.up_proj", 0, torch.tensor([3, 128]))])
    with pytest.raises(ValueError, match=r"index 64 out of range.*64 columns"):
        attach(model, [SlicePlan("model.layers.0.mlp.up_proj", 1, torch.tensor([64]))])
    with pytest.raises(ValueError, match="not unique"):
        SlicePlan("model.layers.0.mlp.up_proj", 0, torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match="negative"):
        SlicePlan("model.layers.0.mlp.up_proj", 0, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="integers"):
        SlicePlan("model.layers.0.mlp.up_proj", 0, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="axis"):
        SlicePlan("model.layers.0.mlp.up_proj", 2, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"unknown impl 'sparse'.*fused.*delta.*masked"):
        attach(model, good, impl="sparse")
    with pytest.raises(ValueError, match="planned twice"):
        attach(model, [good[0], SlicePlan(good[0].module, 1, torch.tensor([0]))])
    # nothing above touched the model
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, SlicedLinear) for m in model.modules())
    attach(model, good)
    with pytest.raises(ValueError, match="merge"):
        attach(model, good)


def test_plan_indices_are_normalised():
    plan = SlicePlan("m", 0, [5, 1, 3])
    assert plan.indices.dtype == torch.long and plan.indices.tolist() == [1, 3, 5]


def test_fused_honours_an_unfrozen_bias_and_refuses_an_unfrozen_weight(base_models):
    model = fresh(base_models, "gpt2", torch.float64)
    plans = make_plans("gpt2")
    attach(model, plans, impl="fused")
    wrapper = model.get_submodule(plans[0].module)
    wrapper.base.bias.requires_grad_(True)
    loss_of(model, batch()).backward()

    reference = fresh(base_models, "gpt2", torch.float64)
    reference.requires_grad_(False)
    reference.get_submodule(plans[0].module).bias.requires_grad_(True)
    loss_of(reference, batch()).backward()
    torch.testing.assert_close(wrapper.base.bias.grad, reference.get_submodule(plans[0].module).bias.grad)

    wrapper.base.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must stay frozen"):
        loss_of(model, batch())
