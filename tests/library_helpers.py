"""Shared helpers of the library tests (`test_library_contract.py`, `test_library.py`): tiny models, a trained
adapter, and state comparisons."""

from __future__ import annotations

import copy
import functools

import torch

from neft_lab import NeuronConfig, NeuronModel, get_neuron_model
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons import sliced

CASES = [(arch, impl) for arch in ("llama", "gpt2", "gemma3") for impl in ("fused", "delta")]
IDS = [f"{arch}-{impl}" for arch, impl in CASES]
BUDGET = 0.05  # of all parameters: 83 (Llama, Gemma) / 129 (GPT-2) of 512 up/down vectors
MERGE_TOLERANCE = 1e-5  # delta: merged weights hold base + delta rounded once; |logits| ~ 5, float32
INPUT = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(1))
FORBIDDEN = ("hydra", "omegaconf", "lightning", "pytorch_lightning", "lightning_fabric")


@functools.cache
def _tiny(arch: str) -> torch.nn.Module:
    return build_tiny_model(arch)[0].eval()  # eval: GPT-2's dropout off


def base_model(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return copy.deepcopy(_tiny(arch)).to(dtype)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def trained(arch: str, impl: str, dtype: torch.dtype = torch.float32, steps: int = 2) -> NeuronModel:
    """A wrapped tiny model after `steps` AdamW steps (bf16 models train under bf16 autocast)."""
    model = get_neuron_model(base_model(arch, dtype), NeuronConfig(method="random", budget=BUDGET, impl=impl))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=INPUT, labels=INPUT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ (or exist in one only)."""
    return sorted({k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k])})


def selected_mask(model: NeuronModel, module: str) -> torch.Tensor:
    """Which entries of `module`'s stored weight are selected vectors."""
    wrapper = model._wrappers[module]
    mask = torch.zeros_like(sliced.linear_weight(wrapper.base), dtype=torch.bool)
    mask.index_fill_(wrapper.axis, wrapper.indices, True)
    return mask.t() if isinstance(wrapper.base, sliced.Conv1D) else mask
