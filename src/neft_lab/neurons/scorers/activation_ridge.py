"""Score neurons by how well their activations predict a task's labels: a ridge probe on MLP unit activations.

`scorer=activation_ridge` (`selection=activation_probe`), this project's own probe: it is NOT the paper's. The
paper's preliminary study (§3.1) probes the residual hidden states and ranks neuron vectors by their cosine with
the probe directions; that is `scorer=probe` (`neurons/scorers/probe.py`). This scorer used to be called
`probe` (`selection=probe`); its behaviour is unchanged.

Here every example is run through the frozen model once; each MLP unit's activation (the input of
``down_proj``, i.e. ``act(gate)·up``, the value a neuron writes out) is mean-pooled over the
example's tokens; the activations of all units of all layers are standardised (so that weights are
comparable across units of different scale) and one ridge regression predicts the label (targets ±1;
one-vs-rest columns for more than two classes). A unit's score is the size of its probe weight:
|w| for two classes, the Euclidean norm of its C one-vs-rest weights otherwise.

The ridge is solved in closed form from one thin SVD of the (examples × units) matrix, which also
gives the leave-one-out residuals of every penalty at once, so `alpha=None` picks the penalty from a
grid by leave-one-out accuracy (centring uses all examples, so the LOO is approximate).

A score belongs to a neuron, not to a vector: its up row, gate row and down column all get it, so
the budget takes whole neurons first. Direction: HIGH = informative = selected first
(`HIGHER_IS_SELECTED`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace, VectorGroup

logger = logging.getLogger(__name__)

HIGHER_IS_SELECTED = True  # a large probe weight = an informative neuron
NEURON_KINDS = ("up", "gate", "down")  # the vectors that belong to an MLP unit
ALPHA_GRID = tuple(10.0**k for k in range(-3, 6))


@dataclass(frozen=True)
class RidgeProbe:
    """A fitted probe: weights on standardised features [units, columns], and how well it predicts."""

    weights: torch.Tensor
    alpha: float
    classes: tuple[int, ...]
    train_accuracy: float
    loo_accuracy: float  # leave-one-out (approximate: the centring sees every example)

    def unit_scores(self) -> torch.Tensor:
        """|w| per unit (the norm over one-vs-rest columns when there are more than two classes)."""
        return self.weights.norm(dim=1)


def fit_ridge_probe(
    features: torch.Tensor, labels: Sequence[int] | torch.Tensor, alpha: float | None = None
) -> RidgeProbe:
    """Ridge regression of ±1 label columns on standardised `features` [examples, units].

    Constant features get weight 0. `alpha` None: the grid value with the best leave-one-out accuracy.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if features.ndim != 2 or features.shape[0] != labels.numel():
        raise ConfigError(
            f"{labels.numel()} labels for features of shape {list(features.shape)}: give one label per example"
        )
    classes, index = torch.unique(labels, return_inverse=True)
    if classes.numel() < 2:
        raise ConfigError(
            f"every example has the label {classes.tolist()}: a probe needs at least two classes "
            "(give labelled examples of each class)"
        )
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"alpha={alpha}: the ridge penalty must be > 0 (or None to choose it)")
    x = features.double()
    std = x.std(dim=0, unbiased=False)
    varies = std > 1e-12 * x.abs().amax(dim=0).clamp_min(1e-30)
    x = (x - x.mean(dim=0)) / torch.where(varies, std, torch.inf)  # constant units → 0
    onehot = torch.nn.functional.one_hot(index, classes.numel()).double() * 2 - 1
    y = onehot[:, 1:] if classes.numel() == 2 else onehot  # two classes: one ±1 column
    y_mean = y.mean(dim=0)
    y = y - y_mean
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    candidates = sorted(ALPHA_GRID, reverse=True) if alpha is None else [float(alpha)]  # ties: most penalised
    best: tuple[float, float, float] | None = None  # (loo accuracy, alpha, train accuracy)
    for value in candidates:
        shrink = s.square() / (s.square() + value)
        fitted = u @ (shrink[:, None] * uty)
        leverage = (u.square() @ shrink).clamp(max=1 - 1e-9)
        loo = y - (y - fitted) / (1 - leverage)[:, None]
        loo_acc = _accuracy(loo + y_mean, index)
        if best is None or loo_acc > best[0]:
            best = (loo_acc, value, _accuracy(fitted + y_mean, index))
    assert best is not None
    loo_acc, chosen, train_acc = best
    weights = vh.T @ ((s / (s.square() + chosen))[:, None] * uty)
    weights[~varies] = 0  # exactly: a unit that never changes carries no information
    return RidgeProbe(weights.float(), chosen, tuple(int(c) for c in classes), train_acc, loo_acc)


def _accuracy(scores: torch.Tensor, index: torch.Tensor) -> float:
    predicted = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(dim=1)
    return float((predicted == index).double().mean())


def unit_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Layer → [examples, units]: each MLP unit's activation (input of down_proj) mean-pooled over each text's tokens.

    Texts are tokenized one by one and right-padded here (the pad id never matters: the attention
    mask hides it), truncated to `max_length` tokens. The model runs in eval mode without gradients.
    """
    if not len(texts):
        raise ConfigError("the probe got no texts: give labelled examples of the task")
    downs = _unit_groups(model)
    pooled: dict[int, list[torch.Tensor]] = {g.layer: [] for g in downs}
    mask_now: list[torch.Tensor] = []

    def hook(layer: int):
        def on_forward(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            units, mask = inputs[0].float(), mask_now[0]
            summed = (units * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            pooled[layer].append(summed.cpu())

        return on_forward

    handles = [model.get_submodule(g.module).register_forward_pre_hook(hook(g.layer)) for g in downs]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="activation probe", disable=not progress):
                encoded = [
                    tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                    for text in texts[start : start + batch_size]
                ]
                if not all(encoded):
                    raise ConfigError(
                        f"a text among examples {start}..{start + batch_size - 1} has no tokens"
                    )
                width = max(len(ids) for ids in encoded)
                input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, ids in enumerate(encoded):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention_mask[row, : len(ids)] = 1
                mask_now[:] = [attention_mask.to(device).float()]
                model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
                )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {layer: torch.cat(chunks) for layer, chunks in pooled.items()}


def unit_scores_to_groups(
    unit_scores: dict[int, torch.Tensor], space: NeuronSpace
) -> dict[str, torch.Tensor]:
    """Group name → scores: every up/gate/down group of a layer gets that layer's unit scores."""
    scores = {}
    for group in space.groups:
        layer_scores = unit_scores.get(group.layer)
        if group.kind not in NEURON_KINDS or layer_scores is None or layer_scores.numel() != group.count:
            raise ConfigError(
                f"the probe scores MLP neurons, but group {group.name} ({group.count} vectors) is not one of "
                f"a layer's {NEURON_KINDS} vectors: use selection.modules among {NEURON_KINDS}"
            )
        scores[group.name] = layer_scores.clone()
    return scores


def activation_ridge_scores(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | torch.Tensor,
    space: NeuronSpace | None = None,
    *,
    alpha: float | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Group name → probe weight size of each vector's neuron (HIGH = informative = selected first).

    `texts` and integer `labels` are a labelled classification task (at least two classes);
    `space` defaults to the model's up/down vectors.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != len(texts):
        raise ConfigError(f"{len(texts)} texts but {labels.numel()} labels: give one label per text")
    space = NeuronSpace.from_model(model) if space is None else space
    activations = unit_activations(
        model, tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=progress
    )
    layers = sorted(activations)
    probe = fit_ridge_probe(torch.cat([activations[layer] for layer in layers], dim=1), labels, alpha)
    logger.info(
        "activation ridge probe on %d examples, %d units, %d classes: alpha %g, train accuracy %.3f, leave-one-out %.3f",
        labels.numel(),
        probe.weights.shape[0],
        len(probe.classes),
        probe.alpha,
        probe.train_accuracy,
        probe.loo_accuracy,
    )
    per_unit = probe.unit_scores().split([activations[layer].shape[1] for layer in layers])
    return unit_scores_to_groups(dict(zip(layers, per_unit)), space)


def _unit_groups(model: nn.Module) -> tuple[VectorGroup, ...]:
    """The down-projection groups, whose inputs are the MLP units' activations."""
    return NeuronSpace.from_model(model, kinds=("down",)).groups
