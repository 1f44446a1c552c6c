"""A 4-bit frozen base under NeFT's float32 vectors (the QLoRA idea, for neurons): bitsandbytes' `Linear4bit`.

The frozen linear layers are stored in 4 bits (NF4 by default, as QLoRA); NeFT's selected vectors stay float32
trainable slices whose difference to the (dequantized) base slice is added to the quantized layer's output
(`SlicedLinear.use_quantized_base`). Quantize *after* attaching the slices: the selection reads the weights'
shapes and the fused vectors start from the exact, unquantized values. bitsandbytes runs its 4-bit layers on
CPUs too (pure-torch kernels); it is imported only here, when asked for.
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` holds a bitsandbytes-quantized weight (it has a `quant_state`)."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(
            "a 4-bit base needs bitsandbytes: pip install 'neft_lab[quant]' (or pip install bitsandbytes)"
        ) from None
    return bitsandbytes


def quantize_linear(
    module: nn.Linear, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A frozen 4-bit copy of `module` (bitsandbytes `Linear4bit`), on the module's device."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: choose one of {QUANT_TYPES}")
    bnb = _bitsandbytes()
    device = module.weight.device
    quantized = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        device="meta",
    )
    # bitsandbytes repacks a CPU layer for a bfloat16 kernel at its first eval-mode forward (on AVX512-BF16 CPUs)
    # and back at every state_dict: validation, test and a reloaded run would each compute in another precision.
    # One path: the dequantized weight in compute_dtype, as in training (CPU evaluation is slower for it).
    quantized.support_avx512bf16_for_cpu = False
    quantized.weight = bnb.nn.Params4bit(
        module.weight.detach().to(torch.float32).contiguous(), requires_grad=False, quant_type=quant_type
    )
    if module.bias is not None:
        quantized.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return quantized.to(device)  # bitsandbytes quantizes as the weight moves to its device


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 [out, in] weight a 4-bit layer computes with."""
    functional = _bitsandbytes().functional
    weight = module.weight
    return functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)


def quantize_frozen_linears(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
    include_trainable: bool = False,
) -> int:
    """Store every frozen linear layer of `model` in 4 bits, the bases under NeFT's slices included; returns how
    many. Layers that train (a parameter with `requires_grad`) stay as they are unless `include_trainable` (a
    freshly loaded model, all `requires_grad`, about to get LoRA adapters: QLoRA), and so do those in `skip`."""
    from neft_lab.neurons.sliced import SlicedLinear  # here: sliced imports this module

    count = 0
    wrapped = {name for name, m in model.named_modules() if isinstance(m, SlicedLinear)}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in skip or is_quantized(module):
            continue
        if isinstance(module, SlicedLinear) and type(module.base) is nn.Linear:
            module.use_quantized_base(quantize_linear(module.base, quant_type, compute_dtype))
            count += 1
        elif (
            type(module) is nn.Linear
            and name.rsplit(".", 1)[0] not in wrapped
            and (include_trainable or not any(p.requires_grad for p in module.parameters()))
        ):
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                child,
                quantize_linear(module, quant_type, compute_dtype),
            )
            count += 1
    return count
