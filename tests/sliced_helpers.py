"""Shared helpers of the sliced-layer tests (`test_sliced.py` on the CPU, `test_gpu.py` on every device).

Tiny models, neuron plans, and the reference the sliced layers must equal: dense training of the planned
weights with every non-selected gradient zeroed by hand. Everything takes the device from the model, so one
test body runs on the CPU in CI and on CUDA under `-m gpu`.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import nn

from neft_lab.masters import keep_trainable_in
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.sliced import SlicePlan, linear_weight, sync, trainable_slices

ARCHS = ("llama", "gemma3", "gpt2")
MLP = {  # (input-vector module, output-vector module) per layer; rows of the first, columns of the second
    "llama": ("model.layers.{l}.mlp.up_proj", "model.layers.{l}.mlp.down_proj"),
    "gemma3": ("model.layers.{l}.mlp.up_proj", "model.layers.{l}.mlp.down_proj"),
    "gpt2": ("transformer.h.{l}.mlp.c_fc", "transformer.h.{l}.mlp.c_proj"),
}
D_FF = 128


@functools.cache
def tiny_base_models() -> dict[str, nn.Module]:
    """One tiny model per architecture, on the CPU in float32; tests take copies with `fresh`."""
    models = {}
    for arch in ARCHS:
        model, _ = build_tiny_model(arch)
        models[arch] = model.eval()  # eval: GPT-2's dropout off, so runs are deterministic
    return models


def fresh(
    base_models: dict[str, nn.Module], arch: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> nn.Module:
    return copy.deepcopy(base_models[arch]).to(device=device, dtype=dtype)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_plans(arch: str, k: int = 20, seed: int = 0, layers: int = 2) -> list[SlicePlan]:
    gen = torch.Generator().manual_seed(seed)
    plans = []
    for layer in range(layers):
        up, down = (name.format(l=layer) for name in MLP[arch])
        plans.append(SlicePlan(up, 0, torch.randperm(D_FF, generator=gen)[:k]))
        plans.append(SlicePlan(down, 1, torch.randperm(D_FF, generator=gen)[:k]))
    return plans


def batch(seed: int = 1, rows: int = 2, length: int = 12) -> torch.Tensor:
    """Token ids on the CPU (`loss_of` moves them to the model's device): the same batch on every device."""
    return torch.randint(4, 500, (rows, length), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(device_of(model))
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on the model's device; a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_of(model).type, dtype=dtype)


def slice_mask(weight_a: torch.Tensor, plan: SlicePlan) -> torch.Tensor:
    """Boolean mask of the planned entries, in linear orientation, on the weight's device."""
    mask = torch.zeros(weight_a.shape, dtype=torch.bool, device=weight_a.device)
    indices = plan.indices.to(weight_a.device)
    if plan.axis == 0:
        mask[indices] = True
    else:
        mask[:, indices] = True
    return mask


def grad_a(module: nn.Module) -> torch.Tensor:
    """The weight gradient in linear orientation."""
    return module.weight.grad if isinstance(module, nn.Linear) else module.weight.grad.t()


def train_dense_reference(
    model: nn.Module,
    plans: list[SlicePlan],
    steps: int,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
    autocast_dtype: torch.dtype | None = None,
    masters: torch.dtype | None = None,
    **opt_kwargs,
) -> None:
    """Dense training of the planned weights with every non-selected gradient zeroed by hand.

    `masters=torch.float32` keeps the planned weights in float32 (as `optim.master_dtype=float32` does for
    `impl=masked`) while the rest of the model keeps its dtype; `autocast_dtype` trains under autocast.
    """
    model.requires_grad_(False)
    params = []
    for plan in plans:
        module = model.get_submodule(plan.module)
        module.weight.requires_grad_(True)
        params.append((module, plan))
    keep_trainable_in(model, masters)
    optimizer = optimizer_cls([m.weight for m, _ in params], **opt_kwargs)
    for step in range(steps):
        with autocast(model, autocast_dtype):
            loss = loss_of(model, batch(step))
        loss.backward()
        with torch.no_grad():
            for module, plan in params:
                grad_a(module).mul_(slice_mask(linear_weight(module), plan))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def train_sliced(
    model: nn.Module,
    steps: int,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
    autocast_dtype: torch.dtype | None = None,
    **opt_kwargs,
) -> None:
    """Train the slice parameters of an attached model on the same batches as `train_dense_reference`."""
    optimizer = optimizer_cls([p for _, p in trainable_slices(model)], **opt_kwargs)
    for step in range(steps):
        with autocast(model, autocast_dtype):
            loss = loss_of(model, batch(step))
        loss.backward()
        optimizer.step()
        sync(model)
        optimizer.zero_grad(set_to_none=True)


def assert_only_slices_moved(model: nn.Module, base: nn.Module, plans: list[SlicePlan]) -> None:
    """After `merge`: every selected vector changed; every other entry of every tensor is bit-identical.

    `base` is the untrained model in the dtype the trained one's frozen weights have.
    """
    planned = {p.module: p for p in plans}
    base_params = dict(base.named_parameters())
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if module_name in planned and name.endswith("weight"):
            plan = planned[module_name]
            trained_a = linear_weight(model.get_submodule(module_name))
            base_a = linear_weight(base.get_submodule(module_name)).to(trained_a.device)
            mask = slice_mask(base_a, plan)
            assert torch.equal(trained_a[~mask], base_a[~mask]), f"{name}: a frozen entry moved"
            changed = (trained_a != base_a).any(dim=1 - plan.axis)[plan.indices.to(trained_a.device)]
            assert changed.all(), f"{name}: every selected vector trains"
        else:
            assert torch.equal(param, base_params[name].to(param.device)), name
