"""Score neuron vectors by the loss gradient, with no weight update, no optimizer and no dense weight gradient.

The cosine scorer needs a short full fine-tune (weights + gradients + two AdamW states: 16 bytes per
parameter) before it can say which vectors move. This scorer asks the same question of the loss
directly: how strongly does the task's loss pull on each vector? For every up row / down column (and
any other `NeuronSpace` group) it accumulates the empirical Fisher of that vector,

    score(v) = 1/N · Σ_b ||∂L_b/∂v||²        (N batches, L_b the batch's mean target-token loss)

i.e. the sum of per-batch squared gradient norms divided by the number of batches (with
``per_example=True``: per-example losses and the mean over examples instead).

How, without weight gradients: a linear layer ``y = x Aᵀ`` (``A`` [out, in]) has the weight gradient
``G = Σ_t gy_tᵀ x_t``. Row i of ``G`` (an up row) is ``Σ_t gy[t, i] x[t, :]`` and column j (a down
column) is ``Σ_t gy[t, :] x[t, j]``, so each vector's squared norm comes from the layer's input ``x``
and output gradient ``gy`` alone: either from slices of ``G`` formed a chunk of vectors at a time, or
from the Gram form ``||Σ_t a_ti b_t||² = a_iᵀ (B Bᵀ) a_i`` (whichever costs fewer flops, as in
`neurons/dense_norm.py`). Forward hooks keep ``x``; a hook on each output receives ``gy`` during one
input-only backward (``torch.autograd.grad`` w.r.t. the embeddings' output), reduces it to one number
per vector and drops it. Every parameter is frozen while scoring (and restored after), so no ``.grad``
is ever allocated: peak memory is the model, the activations of one backward and one layer's
statistics — no weight gradients, no optimizer state.

Direction: HIGH = the loss pulls hard on this vector = selected first (`HIGHER_IS_SELECTED`), the
opposite of cosine, where LOW (moved) is selected first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from neft_lab.errors import ConfigError
from neft_lab.losses import IGNORE_INDEX, target_token_loss
from neft_lab.neurons.geometry import NeuronSpace

logger = logging.getLogger(__name__)

HIGHER_IS_SELECTED = True  # a large expected squared gradient = an important vector
BATCH_KEYS = ("input_ids", "attention_mask", "labels")
CHUNK_ELEMENTS = 1 << 24  # largest temporary per chunk (64 MiB in float32)
FORMS = ("auto", "outer", "gram")


def vector_sq_norms(
    x: torch.Tensor,
    gy: torch.Tensor,
    linear_axis: int,
    example_weights: torch.Tensor | None = None,
    form: str = "auto",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Squared norm of each row (`linear_axis` 0) or column (1) of ``G = Σ_t gy_tᵀ x_t`` without forming ``G``.

    `x` [..., d_in] and `gy` [..., d_out] are one layer's input and output gradient. Without
    `example_weights` all tokens form one gradient; with them (one weight per leading-dim example)
    each example's gradient is normed on its own and the weighted norms are summed. `form` picks the
    slice form (N·d_in·d_out flops) or the Gram form (N²·(d_in+d_out)); "auto" takes the cheaper.
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r}: choose one of {FORMS}")
    x, gy = x.float(), gy.float()
    if example_weights is None:
        x, gy = x.reshape(1, -1, x.shape[-1]), gy.reshape(1, -1, gy.shape[-1])
    elif x.ndim != 3 or x.shape[0] != example_weights.numel():
        raise ConfigError(
            f"per-example scores need each layer's input as [examples, tokens, features]; got {list(x.shape)} "
            f"for {example_weights.numel()} examples: use per_example=False with this model"
        )
    # `a` indexes the vectors (its features are rows/columns of G), `b` spans each vector's entries
    a, b = (gy, x) if linear_axis == 0 else (x, gy)
    batch, tokens, count, length = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    gram = form == "gram" or (form == "auto" and tokens * (count + length) < count * length)
    parts = []
    if gram:
        kernel = b @ b.transpose(1, 2)  # [batch, tokens, tokens]
        step = max(1, chunk_elements // max(1, batch * tokens))
        for start in range(0, count, step):
            chunk = a[:, :, start : start + step]
            parts.append(((kernel @ chunk) * chunk).sum(1).clamp_min(0))
    else:
        step = max(1, chunk_elements // max(1, batch * length))
        for start in range(0, count, step):
            chunk = a[:, :, start : start + step]
            parts.append((chunk.transpose(1, 2) @ b).square().sum(-1))
    per_example = torch.cat(parts, dim=1)  # [batch, count]
    if example_weights is None:
        return per_example[0]
    return (per_example * example_weights.to(per_example)[:, None]).sum(0)


def gradient_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    space: NeuronSpace | None = None,
    *,
    max_batches: int | None = None,
    per_example: bool = False,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, int]] = target_token_loss,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Group name → empirical Fisher of each vector (mean squared loss gradient; HIGH = selected first).

    `batches` are causal-LM batches ({input_ids, attention_mask, labels}, labels -100 where no loss),
    e.g. `TaskDataModule.train_dataloader()`; at most `max_batches` of them are used (batches with no
    target token are skipped). `space` defaults to the model's up/down vectors. The model is left as
    it was: same weights (never written), same `requires_grad` flags and train/eval mode, no `.grad`.
    Scoring runs in eval mode (no dropout: the same batches give the same scores). `loss_fn` is the
    training loss (`target_token_loss`); `per_example` assumes it is a mean over target tokens.
    """
    space = NeuronSpace.from_model(model) if space is None else space
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches={max_batches}: score on at least one batch (or None for all)")
    device = next(model.parameters()).device
    stats = _FisherHooks(model, space, device)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    used = examples = skipped = 0
    total = max_batches if max_batches is not None else _length(batches)
    try:
        model.requires_grad_(False).eval()
        with torch.enable_grad():
            for index, raw in enumerate(
                tqdm(batches, desc="gradient scores", total=total, disable=not progress)
            ):
                batch = _checked_batch(raw, index, device)
                targets = batch["labels"][:, 1:] != IGNORE_INDEX
                if not targets.any():
                    skipped += 1
                    continue
                per_row = targets.sum(1)
                if per_example:  # the batch loss is Σ_e (n_e/n)·L_e, so ∂L_e = (n/n_e)·∂(e's share)
                    stats.weights = torch.where(per_row > 0, per_row.sum() / per_row.clamp_min(1), 0).square()
                loss, _ = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"batch {index} gives a non-finite loss ({float(loss)}): the model or its inputs are "
                        "broken (a diverged checkpoint? token ids beyond the vocabulary?)"
                    )
                torch.autograd.grad(loss, stats.take_embeddings(), allow_unused=True)  # fires the hooks
                used += 1
                examples += int((per_row > 0).sum())
                if max_batches is not None and used >= max_batches:
                    break
    finally:
        stats.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    if used == 0:
        raise ConfigError(
            "gradient scoring got no batch with target tokens"
            + (
                f" ({skipped} batches had none: every label is -100)"
                if skipped
                else " (the batches are empty)"
            )
            + ": give task data with targets (selection.scorer=gradient scores on the task's training batches)"
        )
    if skipped:
        logger.warning("gradient scoring skipped %d batches with no target token", skipped)
    denominator = examples if per_example else used
    scores = {name: (value / denominator).float().cpu() for name, value in stats.sums.items()}
    logger.info(
        "gradient scores from %d batches (%d examples), %s Fisher over %d vectors",
        used,
        examples,
        "per-example" if per_example else "per-batch",
        space.num_vectors,
    )
    return scores


class _FisherHooks:
    """Forward hooks that keep each scored layer's input and turn its output gradient into per-vector sums."""

    def __init__(self, model: nn.Module, space: NeuronSpace, device: torch.device) -> None:
        self.sums = {g.name: torch.zeros(g.count, dtype=torch.float32, device=device) for g in space.groups}
        self.weights: torch.Tensor | None = None  # per-example mode: (n/n_e)² per row of the batch
        self._embedded: list[torch.Tensor] = []
        self._handles: list[Any] = []
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise ConfigError(
                f"{type(model).__name__} exposes no input embeddings (get_input_embeddings): gradient scoring "
                "needs a Hugging Face causal LM"
            )
        modules = []
        for group in space.groups:  # all found before any hook is attached: a failure leaves no hook
            try:
                modules.append(model.get_submodule(group.module))
            except AttributeError:
                raise ConfigError(
                    f"the model has no module {group.module} for neuron group {group.name}: score with the "
                    "neuron space of this model (NeuronSpace.from_model(model))"
                ) from None
        self._handles.append(embeddings.register_forward_hook(self._on_embed))
        for group, module in zip(space.groups, modules):
            self._handles.append(module.register_forward_hook(self._hook(group.name, group.linear_axis)))

    def _on_embed(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().requires_grad_(True)  # the one leaf the backward differentiates to
        self._embedded.append(output)
        return output

    def _hook(self, name: str, linear_axis: int) -> Callable[..., None]:
        def on_forward(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:  # e.g. the no-grad first pass of reentrant checkpointing
                return
            x, weights = inputs[0].detach(), self.weights

            def on_grad(gy: torch.Tensor) -> None:
                self.sums[name] += vector_sq_norms(x, gy, linear_axis, weights)

            output.register_hook(on_grad)

        return on_forward

    def take_embeddings(self) -> list[torch.Tensor]:
        embedded, self._embedded = self._embedded, []
        if not embedded:
            raise ConfigError("the model's forward did not use its input embeddings: cannot score gradients")
        return embedded

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._embedded.clear()


def _checked_batch(raw: Any, index: int, device: torch.device) -> dict[str, torch.Tensor]:
    missing = [k for k in BATCH_KEYS if not isinstance(raw, Mapping) or k not in raw]
    if missing:
        raise ConfigError(
            f"batch {index} lacks {missing}: gradient scoring takes causal-LM batches with input_ids, "
            "attention_mask and labels (-100 where no loss), as TaskDataModule.train_dataloader() yields"
        )
    return {k: raw[k].to(device) for k in BATCH_KEYS}


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
