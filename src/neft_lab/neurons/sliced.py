"""Neuron-sliced linear layers: train only selected rows or columns of a weight, freeze the rest.

NeFT trains "neuron vectors": rows of `up_proj.weight` (a neuron's input vector) and columns of
`down_proj.weight` (its output vector). The authors set `requires_grad` on every up/down weight
(everything else frozen), clip on the norm of those dense gradients, then zero the non-selected
entries before `optimizer.step()`: dense gradients and dense AdamW state for 41% of Llama-2-7B, and
decoupled weight decay (0 in the paper) would shrink up/down entries that were never selected.
Here only the selected vectors are parameters, so gradients and optimizer state cover only them and
every other entry stays bit-identical (their clipping norm: `neurons/dense_norm.py`).

Everything works in *linear orientation*: a layer computes ``y = x A^T + b`` with ``A`` of shape
``[out, in]``. For ``nn.Linear`` ``A = weight``; for GPT-2's ``Conv1D`` (weight stored
``[in, out]``) ``A = weight.T``. A slice takes rows of ``A`` (``axis=0``, output units) or
columns (``axis=1``, input units); a module gets at most one slice.

Three implementations, chosen with ``impl``:

- ``fused`` (fast; the S2FT / PEFT trainable-tokens form): the selected vectors live inside the
  live weight; a custom autograd function computes the input gradient and only the slice's
  weight gradient, saving only the activations it needs (``x[..., idx]`` for columns).
  The slice parameter is a copy that the optimizer updates; `sync` writes it back (done lazily
  on the next forward as well, when the parameter's version counter shows it changed).
- ``delta``: a zero-initialised trainable delta added in the forward; no write-back, simple to
  shard, one extra small GEMM per module.
- ``masked``: the authors' way, kept for benchmarks — see `MaskedGrad`.

Typical use::

    attach(model, plans, impl="fused")
    opt = torch.optim.AdamW([p for _, p in trainable_slices(model)], lr=2e-5)
    ... loss.backward(); opt.step(); sync(model) ...
    merge(model); model.save_pretrained(out)          # a plain HF checkpoint
    # or: torch.save(delta_state(model), "delta.pt") and later apply_delta(base_model, delta)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but keep this module importable without it

    class Conv1D(nn.Module):  # type: ignore[no-redef]
        """Placeholder so isinstance checks work when transformers is absent."""


IMPLS = ("fused", "delta", "masked")
_SUFFIXES = ("indices", "vectors", "axis")
# impl=delta's trained difference itself, beside its values (`neft_lab.library` adapters): `vectors` is
# base + delta rounded once, so a delta impl reloads bit for bit only from this; `apply_delta` ignores it
_OPTIONAL_SUFFIXES = ("delta",)


@dataclass(frozen=True)
class SlicePlan:
    """Which units of one module train: rows (``axis=0``) or columns (``axis=1``) of ``A``.

    ``indices`` is normalised to a sorted, unique, 1-D CPU ``LongTensor``; duplicates are an error
    (they would mean one vector counted twice in a budget).
    """

    module: str
    axis: int
    indices: torch.Tensor

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValueError(
                f"SlicePlan({self.module!r}): axis must be 0 (rows of A) or 1 (columns), got {self.axis}"
            )
        idx = torch.as_tensor(self.indices)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"SlicePlan({self.module!r}): indices must be integers, got dtype {idx.dtype}")
        if idx.ndim > 1:
            raise ValueError(f"SlicePlan({self.module!r}): indices must be 1-D, got shape {tuple(idx.shape)}")
        idx = idx.detach().to("cpu", torch.long).reshape(-1)
        if idx.numel() == 0:
            raise ValueError(f"SlicePlan({self.module!r}): no indices selected; leave the module out instead")
        unique = torch.unique(idx, sorted=True)
        if unique.numel() != idx.numel():
            raise ValueError(
                f"SlicePlan({self.module!r}): indices are not unique "
                f"({idx.numel() - unique.numel()} duplicates)"
            )
        if int(unique[0]) < 0:
            raise ValueError(f"SlicePlan({self.module!r}): negative index {int(unique[0])}")
        object.__setattr__(self, "indices", unique)


# ----------------------------------------------------------------------------------------------
# Orientation helpers


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """``A`` in linear orientation ([out, in]) as a view of the module's weight (no copy)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device types without autocast support
        return None
    return None


# ----------------------------------------------------------------------------------------------
# fused: slice-only weight gradient


class _SlicedLinearFn(torch.autograd.Function):
    """y = F.linear(x, A, b); backward gives grad_x and the gradient of the selected slice only.

    ``vectors`` is an input only so autograd routes its gradient; the forward reads the values
    from ``A`` (where `sync` keeps them). Under autocast x, A and b are cast to the autocast dtype
    and the matmuls run with autocast off (the same math autocast would do for nn.Linear).
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, vectors, indices, axis: int):  # type: ignore[override]
        compute = _autocast_dtype(x)
        device_type = x.device.type
        if compute is not None:
            with torch.autocast(device_type, enabled=False):
                xc, wc = x.to(compute), weight.to(compute)
                y = F.linear(xc, wc, None if bias is None else bias.to(compute))
        else:
            xc, wc = x, weight
            y = F.linear(x, weight, bias)
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        saved_x = None
        if need_v:  # rows need all of x; columns only the selected input units (the memory win)
            saved_x = xc if axis == 0 else xc.index_select(-1, indices)
        ctx.save_for_backward(saved_x, wc if need_x else None, indices)
        ctx.axis, ctx.compute, ctx.device_type = axis, compute, device_type
        ctx.x_dtype, ctx.v_dtype = x.dtype, vectors.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_y):  # type: ignore[override]
        saved_x, weight, indices = ctx.saved_tensors
        grad_x = grad_b = grad_v = None
        with torch.autocast(ctx.device_type, enabled=False):
            if ctx.compute is not None:
                grad_y = grad_y.to(ctx.compute)
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(grad_y, weight).to(ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                gy = grad_y.reshape(-1, grad_y.shape[-1])
                xs = saved_x.reshape(-1, saved_x.shape[-1])
                # rows: [k, N] @ [N, in]; columns: [out, N] @ [N, k]
                gy_t = gy.index_select(1, indices).t() if ctx.axis == 0 else gy.t()
                grad_v = gy_t.matmul(xs).to(ctx.v_dtype)
            if ctx.needs_input_grad[2]:  # attach freezes the bias; honour a caller who unfroze it
                grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.b_dtype)
        return grad_x, None, grad_b, grad_v, None, None


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"  # without importing torch.distributed where it is not used


def _shard_rows(stored: torch.Tensor) -> tuple[int, int]:
    """The rows [start, end) of a DTensor sharded on dim 0 (torch.chunk's split, as FSDP2 uses) that this rank
    holds; all of them for a plain tensor."""
    rows = stored.shape[0]
    if not _is_dtensor(stored):
        return 0, rows
    from torch.distributed.tensor import Shard

    placement = stored.placements[0]
    if len(stored.placements) != 1 or not (isinstance(placement, Shard) and placement.dim == 0):
        raise RuntimeError(f"fused NeFT expects FSDP2's Shard(0) weights, got {stored.placements}")
    mesh = stored.device_mesh
    chunk = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    return start, min(start + chunk, rows)


# ----------------------------------------------------------------------------------------------
# masked: the authors' dense variant


class MaskedGrad:
    """Gradient hook that zeroes every entry of a dense weight gradient outside the slice.

    This is how the NeFT authors train (they zero the gradients after clipping, before
    ``optimizer.step()``; this hook zeroes them as they are produced, so the optimizer's own norm
    sees only selected entries, and ``optim.clip_scope=paper`` supplies the authors' dense norm
    from `dense_norm.DenseGradNorm`). Gradients and AdamW state stay dense: no memory is saved. And with
    weight decay, AdamW's decoupled decay ``w -= lr * wd * w`` still shrinks the *non-selected*
    entries, whose gradient is zero — so they do not stay frozen. That is why the `fused` and
    `delta` implementations keep only the selected vectors as parameters.
    """

    def __init__(self, indices: torch.Tensor, dim: int) -> None:
        self.indices, self.dim = indices, dim

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        idx = self.indices.to(grad.device)
        out = torch.zeros_like(grad)
        return out.index_copy_(self.dim, idx, grad.index_select(self.dim, idx))


# ----------------------------------------------------------------------------------------------
# The wrapper module


class SlicedLinear(nn.Module):
    """Wraps an ``nn.Linear`` / ``Conv1D`` (kept as ``.base`` so `merge` can restore it).

    Trainable parameter: ``vectors`` (fused: the selected slice values), ``delta`` (delta: zero at
    start) or ``base.weight`` itself (masked). Slice shapes are in linear orientation:
    rows ``[k, in]``, columns ``[out, k]``.
    """

    def __init__(self, base: nn.Module, axis: int, indices: torch.Tensor, impl: str) -> None:
        super().__init__()
        self.base, self.axis, self.impl = base, axis, impl
        weight = linear_weight(base)
        self.register_buffer("indices", indices.to(weight.device), persistent=True)
        self._hook = None
        self._synced_version = -1
        self.sharded = False  # under FSDP2 (training.distributed.shard): forward sees gathered copies
        self.quantized = False  # a 4-bit base (use_quantized_base): the slice is added to its output
        if impl == "fused":
            self.vectors = nn.Parameter(weight.detach().index_select(axis, self.indices).clone())
            self._synced_version = self.vectors._version
        elif impl == "delta":
            shape = list(weight.shape)
            shape[axis] = indices.numel()
            self.delta = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        elif impl == "masked":
            base.weight.requires_grad_(True)
            dim = axis if isinstance(base, nn.Linear) else 1 - axis  # Conv1D stores A transposed
            self._hook = base.weight.register_hook(MaskedGrad(self.indices, dim))
        else:
            raise ValueError(f"unknown impl {impl!r}: choose one of {IMPLS}")

    @property
    def weight_a(self) -> torch.Tensor:
        if self.quantized:
            raise RuntimeError("a 4-bit base has no weight to read or write: use its dequantized slice")
        return linear_weight(self.base)

    def extra_repr(self) -> str:
        kind = "rows" if self.axis == 0 else "columns"
        size = (self.base.out_features, self.base.in_features)[self.axis] if self.quantized else None
        size = size or self.weight_a.shape[self.axis]
        return f"impl={self.impl}, {kind}={self.indices.numel()} of {size}" + (
            ", 4-bit base" if self.quantized else ""
        )

    @torch.no_grad()
    def use_quantized_base(self, quantized: nn.Module) -> None:
        """Swap the frozen base for its 4-bit form (`neurons/quantized.py`). The forward is then the 4-bit layer's
        output plus the slice's difference to the dequantized base slice (kept as a buffer): `fused` vectors
        keep their exact values (from the unquantized weights, when attached before), `delta` adds to the
        4-bit base. Nothing is written into the 4-bit weight, so there is no `sync` and no `merge`."""
        from neft_lab.neurons.quantized import dequantized_weight

        if self.impl == "masked":
            raise ValueError("impl=masked trains the dense base weight: it cannot sit on a 4-bit base")
        dequantized = dequantized_weight(quantized).to(self.indices.device)
        compute = (
            getattr(quantized, "compute_dtype", None) or torch.float32
        )  # what the 4-bit layer computes in
        self.register_buffer(
            "quantized_slice", dequantized.index_select(self.axis, self.indices).to(compute), persistent=False
        )
        self.base = quantized
        self.quantized = True

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        if self.impl == "fused":
            return [("vectors", self.vectors)]
        if self.impl == "delta":
            return [("delta", self.delta)]
        return [("base.weight", self.base.weight)]

    @torch.no_grad()
    def sync(self) -> None:
        """fused: copy the slice parameter into the live weight (in place, same storage). Under FSDP2 (the weight
        and the vectors sharded DTensors) a collective: every rank calls it, and each writes into its own shard."""
        if self.impl != "fused" or self.quantized:
            return
        if _is_dtensor(self.base.weight) or _is_dtensor(self.vectors):
            self._sync_shard()
        else:
            weight = self.weight_a
            weight.index_copy_(self.axis, self.indices, self.vectors.detach().to(weight.dtype))
        self._synced_version = self.vectors._version

    def _sync_shard(self) -> None:
        """FSDP2 shards the stored weight and the vectors along their first dimension, each on its own: the
        vectors are all-gathered (what FSDP2 does before every forward anyway), and each rank writes the
        selected entries that fall into the rows of the weight it holds."""
        vectors = self.vectors.detach()
        full = vectors.full_tensor() if _is_dtensor(vectors) else vectors
        stored = self.base.weight.detach()
        local = stored.to_local() if _is_dtensor(stored) else stored
        start, end = _shard_rows(stored)
        if local.shape[0] != end - start:
            raise RuntimeError(
                f"unexpected FSDP2 shard of {tuple(stored.shape)}: {tuple(local.shape)} local rows"
            )
        conv = isinstance(self.base, Conv1D)
        values = (full.t() if conv else full).to(local.dtype)  # in the stored orientation
        indices = self.indices.to(local.device)
        if (1 - self.axis if conv else self.axis) == 0:  # selected stored rows: those this rank holds
            mine = (indices >= start) & (indices < end)
            local.index_copy_(0, indices[mine] - start, values[mine.to(values.device)])
        else:  # selected stored columns: this rank's rows of them
            local.index_copy_(1, indices, values[start:end])

    def slice_values(self) -> torch.Tensor:
        """The current trained vectors (A orientation), detached."""
        with torch.no_grad():
            if self.impl == "fused":
                return self.vectors.detach().clone()
            base = (
                self.quantized_slice
                if self.quantized
                else self.weight_a.index_select(self.axis, self.indices)
            )
            # (a 4-bit base: its dequantized slice in the layer's compute dtype)
            if self.impl == "delta":  # in the master's precision: a bf16 sum would round the update away
                dtype = torch.promote_types(base.dtype, self.delta.dtype)
                return base.to(dtype) + self.delta.detach().to(dtype)
            return base.clone()

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        """Fold the slice into the base weight and hand back the plain module (all frozen)."""
        if self.quantized:
            raise ValueError(
                "cannot merge into a 4-bit weight: export the delta (delta_state / save_pretrained) and apply it "
                "to the unquantized base"
            )
        if self.impl == "fused":
            self.sync()
        elif self.impl == "delta":  # base + delta summed in the master's precision, rounded once
            weight = self.weight_a
            weight.index_copy_(self.axis, self.indices, self.slice_values().to(weight.dtype))
        elif self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.base.requires_grad_(False)
        return self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "masked":
            return self.base(x)
        if self.quantized:  # the 4-bit layer's output, plus the slice's difference to its base slice
            y = self.base(x)
            change = (
                self.vectors - self.quantized_slice.to(self.vectors.dtype)
                if self.impl == "fused"
                else self.delta
            )
            return _add_slice(y, x, change.to(x.dtype), self.indices, self.axis)
        weight, bias = self.weight_a, self.base.bias
        if self.impl == "fused":
            if weight.requires_grad:
                raise RuntimeError(
                    "the base weight of a fused sliced module must stay frozen (its gradient would be "
                    "dropped): train the slice parameter `vectors`, or merge() and train densely"
                )
            if self.vectors._version != self._synced_version and not self.sharded:  # a step or load since
                self.sync()  # the last sync (under FSDP2 the step syncs the shards: CausalLMModule)
            if torch.is_grad_enabled() and (self.vectors.requires_grad or x.requires_grad):
                return _SlicedLinearFn.apply(x, weight, bias, self.vectors, self.indices, self.axis)
            return F.linear(x, weight, bias)
        y = F.linear(x, weight, bias)
        delta = self.delta.to(x.dtype)  # a float32 master next to a bf16 model (no-op under autocast's cast)
        return _add_slice(y, x, delta, self.indices, self.axis)


def _add_slice(
    y: torch.Tensor, x: torch.Tensor, change: torch.Tensor, indices: torch.Tensor, axis: int
) -> torch.Tensor:
    """`y` plus the output of a change to the selected rows (axis 0: [k, in]) or columns (axis 1: [out, k])."""
    if axis == 0:
        return y.index_add(-1, indices, F.linear(x, change).to(y.dtype))
    return y + F.linear(x.index_select(-1, indices), change).to(y.dtype)


# ----------------------------------------------------------------------------------------------
# Public API


def _linear_names(model: nn.Module, limit: int = 6) -> str:
    names = [n for n, m in model.named_modules() if _is_linear(m) or isinstance(m, SlicedLinear)]
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "[] (the model has no nn.Linear/Conv1D layers)"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _find(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"no module named {name!r} in {type(model).__name__}; linear modules are e.g. {_linear_names(model)}"
        ) from None


def _wrappers(model: nn.Module) -> Iterator[tuple[str, SlicedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, SlicedLinear):
            yield name, module


def attach(model: nn.Module, plans: list[SlicePlan], impl: str = "fused") -> None:
    """Freeze every parameter of `model`, then make only the planned slices trainable (in place).

    Everything is checked before the model is touched, so a bad plan leaves it unchanged.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: choose one of {IMPLS}")
    if any(True for _ in _wrappers(model)):
        raise ValueError("the model already has sliced modules: call merge(model) before attaching again")
    seen: set[str] = set()
    targets: list[tuple[SlicePlan, nn.Module]] = []
    for plan in plans:
        if plan.module in seen:
            raise ValueError(
                f"module {plan.module!r} is planned twice: one slice (rows XOR columns) per module"
            )
        seen.add(plan.module)
        module = _find(model, plan.module)
        if not _is_linear(module):
            raise ValueError(
                f"module {plan.module!r} is a {type(module).__name__}, not nn.Linear or Conv1D; "
                f"linear modules are e.g. {_linear_names(model)}"
            )
        size = linear_weight(module).shape[plan.axis]
        top = int(plan.indices[-1])
        if top >= size:
            kind = "rows (output units)" if plan.axis == 0 else "columns (input units)"
            raise ValueError(
                f"module {plan.module!r}: index {top} out of range for axis {plan.axis}: "
                f"A has {size} {kind} (A shape {tuple(linear_weight(module).shape)})"
            )
        targets.append((plan, module))
    model.requires_grad_(False)
    for plan, module in targets:
        _set_submodule(model, plan.module, SlicedLinear(module, plan.axis, plan.indices, impl))


def trainable_slices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every slice parameter, named as in ``model.named_parameters()``."""
    return [(f"{name}.{pname}", p) for name, w in _wrappers(model) for pname, p in w.trainable()]


def sync(model: nn.Module) -> None:
    """Push fused slice parameters into the live weights; a no-op for delta and masked.

    Call it after each optimizer step and after loading a checkpoint. The forward also syncs
    lazily when a slice parameter's version counter moved, so a forgotten call costs nothing
    worse than a copy — but code that reads the weights directly needs it.
    """
    for _, wrapper in _wrappers(model):
        wrapper.sync()


def sync_after_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Register `sync(model)` as a post-step hook of `optimizer`; returns the removable handle."""
    return optimizer.register_step_post_hook(lambda *_: sync(model))


def merge(model: nn.Module) -> None:
    """Fold the slices into the weights and put the original nn.Linear / Conv1D modules back.

    Afterwards ``model.save_pretrained`` writes a normal HF checkpoint with the original key
    names. Every parameter stays frozen (training with these slices is over).
    """
    for name, wrapper in list(_wrappers(model)):
        _set_submodule(model, name, wrapper.merged_module())


def delta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A compact delta: per sliced module ``<module>.indices``, ``.vectors`` (A orientation), ``.axis``.

    Vectors hold the trained *values* (not differences), so applying them is a copy that does not
    depend on floating-point addition order. Tensors are on the CPU.
    """
    out: dict[str, torch.Tensor] = {}
    for name, wrapper in _wrappers(model):
        out[f"{name}.indices"] = wrapper.indices.detach().cpu().clone()
        out[f"{name}.vectors"] = wrapper.slice_values().cpu().contiguous()
        out[f"{name}.axis"] = torch.tensor(wrapper.axis, dtype=torch.long)
    return out


DELTA_FORMAT = "neft_lab.delta"
# what `base_hash` digests; written beside the digest in the delta's metadata
HASH_SCHEME = "sha256/float32/A"


@torch.no_grad()
def base_hash(model: nn.Module, modules: list[str]) -> str:
    """A content hash of the base weights of `modules` (the ones a delta touches), in sorted name order.

    Per module: its name, the shape of ``A`` (linear orientation) and ``A``'s bytes as contiguous float32.
    Float32 makes a bf16 checkpoint loaded in bf16 or in float32 hash the same (upcasting is exact);
    a float32 checkpoint loaded in bf16 is another (rounded) base and hashes differently. Sliced modules
    are hashed through their `base` weight, so the caller must hash before training changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        module = model.get_submodule(name)
        if isinstance(module, SlicedLinear):
            module = module.base
        weight = linear_weight(module).detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(weight.shape)};".encode())
        digest.update(weight.numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def delta_modules(delta: dict[str, torch.Tensor]) -> list[str]:
    """The module names a delta (from `delta_state`) writes into, sorted."""
    return sorted(_group_delta(delta))


def _group_delta(delta: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in delta.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in (*_SUFFIXES, *_OPTIONAL_SUFFIXES) or not module:
            raise ValueError(f"unexpected key {key!r} in delta: keys end in {_SUFFIXES}")
        groups.setdefault(module, {})[suffix] = value
    for module, parts in groups.items():
        missing = [s for s in _SUFFIXES if s not in parts]
        if missing:
            raise ValueError(f"delta for module {module!r} lacks {missing}")
    return groups


@torch.no_grad()
def apply_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """Write the vectors of `delta` (from `delta_state`) into a plain base model's weights.

    Everything is checked first; a module that is missing, not linear, or whose shape does not
    fit raises ValueError naming the module and the shapes, and the model is left unchanged.
    """
    for weight, axis, indices, vectors in _delta_writes(model, delta):
        weight.index_copy_(axis, indices, vectors)


def check_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first key, module, axis, index or shape of `delta` that does not fit `model`."""
    _delta_writes(model, delta)


def _delta_writes(
    model: nn.Module, delta: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]:
    writes: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    for module_name, parts in _group_delta(delta).items():
        try:
            if any(part in ("", ".", "..") for part in module_name.split(".")):
                raise AttributeError(module_name)
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"delta names module {module_name!r}, which {type(model).__name__} does not have; "
                f"its linear modules are e.g. {_linear_names(model)}"
            ) from None
        if isinstance(module, SlicedLinear):
            raise ValueError(
                f"module {module_name!r} is sliced: apply a delta to a plain model (merge first)"
            )
        if not _is_linear(module):
            raise ValueError(f"module {module_name!r} is a {type(module).__name__}, not nn.Linear or Conv1D")
        if parts["axis"].numel() != 1 or parts["axis"].is_floating_point():
            raise ValueError(f"delta for module {module_name!r}: axis must be one integer, 0 or 1")
        axis = int(parts["axis"])
        if axis not in (0, 1):
            raise ValueError(f"delta for module {module_name!r}: axis {axis}, but a delta slices axis 0 or 1")
        if parts["indices"].is_floating_point() or parts["indices"].dtype == torch.bool:
            raise ValueError(
                f"delta for module {module_name!r}: indices are {parts['indices'].dtype}, not integers"
            )
        indices, vectors = parts["indices"].to(torch.long).reshape(-1), parts["vectors"]
        weight = linear_weight(module)
        expected = list(weight.shape)
        expected[axis] = indices.numel()
        if list(vectors.shape) != expected:
            raise ValueError(
                f"delta for module {module_name!r} does not fit: weight A is {tuple(weight.shape)} "
                f"(out, in), delta vectors are {tuple(vectors.shape)} for {indices.numel()} indices on axis "
                f"{axis}; expected {tuple(expected)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= weight.shape[axis]):
            raise ValueError(
                f"delta for module {module_name!r}: indices span {int(indices.min())}..{int(indices.max())}, "
                f"but A {tuple(weight.shape)} has {weight.shape[axis]} units on axis {axis}"
            )
        if indices.unique().numel() != indices.numel():
            raise ValueError(f"delta for module {module_name!r}: indices repeat a unit")
        writes.append((weight, axis, indices.to(weight.device), vectors.to(weight.device, weight.dtype)))
    return writes
