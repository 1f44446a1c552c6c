"""The authors' clipping norm without their dense gradients: ||dL/dW||_F of whole weight matrices, from activations.

The authors set `requires_grad` on every up/down weight, clip on the norm of all those dense
gradients, then zero the non-selected entries. Sliced NeFT never forms those gradients. For a linear
layer ``y = x A^T`` the weight gradient is ``G = gy^T x`` (N tokens), so

    ||G||_F^2 = sum((x x^T) * (gy gy^T))      (two N x N Gram matrices)

and either form is computed per layer in the backward, reduced to one scalar and dropped: memory
stays one layer's worth; the cost is the cheaper of N·d_in·d_out (dense) and N²·(d_in+d_out) (Gram).
It is exact for one backward per optimizer step on one process: with gradient accumulation or
several ranks the gradients add up before the norm, which per-backward norms cannot reproduce
(`NeftStrategy` refuses those combinations).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def frobenius_sq_of_outer(x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """||gy^T x||_F^2 for x [N, d_in], gy [N, d_out], in float32, by the cheaper of the two forms."""
    x, gy = x.float(), gy.float()
    n, d_in, d_out = x.shape[0], x.shape[1], gy.shape[1]
    if n * n * (d_in + d_out) < n * d_in * d_out:
        return ((x @ x.t()) * (gy @ gy.t())).sum()
    return (gy.t() @ x).square().sum()


class DenseGradNorm:
    """Accumulates, over one backward, the squared Frobenius norm of the full weight gradient of `modules`.

    Hooks: a forward hook keeps each module's input and hooks its output's gradient. The model's input
    embeddings are made to require grad so that every layer gets a gradient, as in the authors' setup
    where every up/down weight requires grad.
    """

    def __init__(self, model: nn.Module, module_names: list[str]) -> None:
        self._total = torch.zeros((), dtype=torch.float32)
        self._handles: list[Any] = []
        for name in module_names:
            self._handles.append(model.get_submodule(name).register_forward_hook(self._on_forward))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_hook(_require_grad))

    def _on_forward(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and module.training and output.requires_grad):
            return
        x = inputs[0].detach()

        def on_grad(gy: torch.Tensor) -> None:
            value = frobenius_sq_of_outer(x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1]))
            self._total = self._total.to(value.device) + value

        output.register_hook(on_grad)

    def take(self) -> torch.Tensor:
        """The norm accumulated since the last call (then reset)."""
        total, self._total = self._total, torch.zeros((), dtype=torch.float32, device=self._total.device)
        return total.sqrt()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and module.training and not output.requires_grad:
        output.requires_grad_(True)
