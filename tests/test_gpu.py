"""NeFT's sliced layers on every device: the same test bodies run on the CPU (fast, in CI) and on CUDA (`-m gpu`).

What must hold on a GPU before any GPU number means anything (issue 12, item 2):

- fused and delta NeFT train exactly what dense training of the planned weights with the non-selected
  gradients zeroed trains (the authors' masked reference): in float32 to float32 rounding, and under bf16
  autocast with float32 masters (a bf16 frozen base, as `model.dtype=bfloat16 trainer=gpu` runs) to bf16
  rounding; with gradient checkpointing off and on;
- after AdamW steps with weight decay every frozen entry is bit-identical to the base, every selected vector moved.

Only the ``cuda`` variants carry the `gpu` mark (conftest skips them without CUDA), so a CPU run proves the
test bodies right before a GPU sees them. float32 matmuls run at "highest" precision (no TF32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neft_lab.masters import keep_trainable_in
from neft_lab.neurons.sliced import SlicePlan, attach, delta_state, linear_weight, merge, trainable_slices
from sliced_helpers import (
    ARCHS,
    assert_only_slices_moved,
    fresh,
    make_plans,
    tiny_base_models,
    train_dense_reference,
    train_sliced,
)

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# float32: the model in float32, no autocast. bf16: a bf16 frozen base, float32 masters, bf16 autocast.
PRECISIONS = {"float32": (torch.float32, None, None), "bf16": (torch.bfloat16, torch.bfloat16, torch.float32)}
# Largest relative error of the trained update (trained - base) against the reference's, per precision.
# Measured on the CPU: fused 0 (bit-identical), delta <= 4e-7 in float32 and <= 7.2e-3 under bf16 (its
# delta GEMM rounds separately); the margins leave room for CUDA's other GEMM kernels.
UPDATE_RTOL = {"float32": 1e-4, "bf16": 3e-2}


@pytest.fixture(scope="module")
def base_models() -> dict[str, nn.Module]:
    return tiny_base_models()


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """TF32 would turn the float32 comparison into a 1e-3 one: keep float32 matmuls exact for these tests."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def prepare(model: nn.Module, checkpointing: bool) -> nn.Module:
    """Gradient checkpointing (HF checkpoints only in training mode) with dropout off, so runs are deterministic."""
    if checkpointing:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


def planned_slices(model: nn.Module, plans: list[SlicePlan]) -> dict[str, torch.Tensor]:
    """The planned vectors of a plain (dense) model, in float32 on the CPU, keyed by module."""
    return {
        p.module: linear_weight(model.get_submodule(p.module))
        .detach()
        .float()
        .cpu()
        .index_select(p.axis, p.indices)
        for p in plans
    }


def worst_update_error(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> float:
    """max over modules of ||Δgot - Δwant|| / ||Δwant||, Δ = trained - base: the update, not the weight, is compared."""
    worst = 0.0
    for module, reference in want.items():
        step_want, step_got = reference - base[module], got[module] - base[module]
        assert step_want.norm() > 0, f"{module}: the reference did not train"
        worst = max(worst, ((step_got - step_want).norm() / step_want.norm()).item())
    return worst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("impl", ["fused", "delta"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_training_equals_dense_masked_reference(
    base_models, arch, impl, checkpointing, precision, device
):
    dtype, autocast_dtype, masters = PRECISIONS[precision]
    plans = make_plans(arch)
    base = planned_slices(fresh(base_models, arch, dtype), plans)

    reference = prepare(fresh(base_models, arch, dtype, device), checkpointing)
    train_dense_reference(
        reference, plans, steps=3, autocast_dtype=autocast_dtype, masters=masters, lr=0.5, momentum=0.9
    )

    model = prepare(fresh(base_models, arch, dtype, device), checkpointing)
    attach(model, plans, impl=impl)
    keep_trainable_in(model, masters)
    assert all(p.dtype == (masters or dtype) for _, p in trainable_slices(model))
    train_sliced(model, steps=3, autocast_dtype=autocast_dtype, lr=0.5, momentum=0.9)

    trained = {
        key.removesuffix(".vectors"): v.float()
        for key, v in delta_state(model).items()
        if key.endswith(".vectors")
    }
    error = worst_update_error(trained, planned_slices(reference, plans), base)
    assert error <= UPDATE_RTOL[precision], f"update differs from the dense masked reference by {error:.2e}"
    if precision == "float32":  # and the whole model, merged, equals the reference's weights
        merge(model)
        got, want = model.state_dict(), reference.state_dict()
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        assert worst <= 1e-5, f"merged weights differ from the reference by {worst:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("impl", ["fused", "delta"])
@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_steps_leave_frozen_weights_bit_identical(base_models, arch, impl, precision, device):
    """AdamW with weight decay and gradient checkpointing on: only the selected vectors move."""
    dtype, autocast_dtype, masters = PRECISIONS[precision]
    plans = make_plans(arch)
    model = prepare(fresh(base_models, arch, dtype, device), checkpointing=True)
    attach(model, plans, impl=impl)
    keep_trainable_in(model, masters)
    train_sliced(
        model,
        steps=3,
        optimizer_cls=torch.optim.AdamW,
        autocast_dtype=autocast_dtype,
        lr=1e-2,
        weight_decay=0.1,
    )
    merge(model)
    assert_only_slices_moved(model, fresh(base_models, arch, dtype), plans)


@pytest.mark.gpu
def test_the_pipeline_evaluates_on_the_training_gpu_before_and_after_fit(tiny_overrides, monkeypatch):
    """Lightning hands the model back on the CPU after fit: generation must not run there (500 segments)."""
    from neft_lab import pipeline
    from neft_lab.config import compose
    from neft_lab.stages import fit as fit_stage

    seen = []
    real = fit_stage.evaluate_split

    def spy(cfg, model, *args, **kwargs):
        seen.append(next(model.parameters()).device.type)
        return real(cfg, model, *args, **kwargs)

    monkeypatch.setattr(fit_stage, "evaluate_split", spy)
    pipeline.run(compose([*tiny_overrides, "trainer=gpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
                          "eval.before=true", "task.data.embedded.n_test=4"]))  # fmt: skip
    assert seen == ["cuda", "cuda"]
