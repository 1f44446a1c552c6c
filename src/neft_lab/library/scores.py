"""Scoring and selection without Hydra: which neuron vectors to train.

    scores = score_neurons(base, tuned)                      # cosine(base, tuned) per vector (the paper)
    scores = gradient_neuron_scores(model, batches)          # no reference fine-tune: the loss gradient
    neurons = select_neurons(scores, budget=0.09)            # or budget="paper_9", or vectors=150_000

Thin wrappers over `neft_lab.neurons` (`scoring.WeightSource`/`cosine_scores`, `scorers.gradient`,
`selection.select`): the same numbers the CLI's selection stages give.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import DEFAULT_KINDS, NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.neurons.scorers import higher_is_selected
from neft_lab.neurons.scoring import WeightSource, cosine_scores, separation_problem
from neft_lab.neurons.selection import METHODS, Budget, budget_share, select

logger = logging.getLogger(__name__)


@dataclass
class NeuronScores:
    """One score per neuron vector of `space`, from `scorer` (its direction: `neurons.scorers.HIGHER_IS_SELECTED`)
    and the parameter count of the model they were made on (a budget share is a share of it)."""

    scores: dict[str, torch.Tensor]  # group name ("up.3") → one score per vector
    space: NeuronSpace
    scorer: str
    total_parameters: int
    model: dict[str, Any] = field(default_factory=dict)  # the base model's identity, recorded in the set

    @property
    def num_vectors(self) -> int:
        return self.space.num_vectors


def score_neurons(
    base: nn.Module | str | Path,
    tuned: nn.Module | str | Path,
    modules: Sequence[str] = DEFAULT_KINDS,
    progress: bool = False,
) -> NeuronScores:
    """The paper's score: the signed cosine between each vector of `base` and of `tuned` (a short full fine-tune
    of it); LOW = moved = selected first. Each may be a model or a Hugging Face folder of safetensors, read one
    weight matrix at a time (two 7B folders are never both in memory). `modules`: the vector kinds (up, down,
    gate, q, k, v, o)."""
    base_source, tuned_source = WeightSource(base), WeightSource(tuned)
    shapes = base_source.shapes()
    space = NeuronSpace.from_shapes(base_source.model_type, shapes, modules)
    scores = cosine_scores(base_source, tuned_source, space, progress=progress)
    if isinstance(base, nn.Module):
        total = sum(p.numel() for p in base.parameters())
    else:
        total = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    return NeuronScores(scores, space, "cosine", total, _identity(base))


def gradient_neuron_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    modules: Sequence[str] = DEFAULT_KINDS,
    max_batches: int | None = None,
    per_example: bool = False,
    progress: bool = False,
) -> NeuronScores:
    """Scores that need no reference fine-tune: each vector's mean squared loss gradient over `batches` (dicts of
    input_ids, attention_mask and labels, -100 where no loss); HIGH = selected first. The model is left as it
    was (`neurons.scorers.gradient.gradient_scores`)."""
    from neft_lab.neurons.scorers.gradient import gradient_scores

    space = NeuronSpace.from_model(model, modules)
    scores = gradient_scores(
        model, batches, space, max_batches=max_batches, per_example=per_example, progress=progress
    )
    total = sum(p.numel() for p in model.parameters())
    return NeuronScores(scores, space, "gradient", total, _identity(model))


def select_neurons(
    scores: NeuronScores | nn.Module,
    budget: float | str | None = None,
    *,
    vectors: int | None = None,
    method: str = "cosine",
    pooling: str = "global",
    seed: int = 0,
) -> NeuronSet:
    """The vectors to train, under a budget: `budget` as a share of all parameters (0.09) or a paper point
    ("paper_9": 150,000 vectors of Llama-2-7B, 9.118%), or `vectors` (a count). `method`: "cosine" (the scorer's
    most affected vectors first, the paper), "reverse" (least affected first) or "random" (which needs no
    scores: pass the model itself). `pooling`: "global" (the paper) or "per_layer"."""
    if method not in METHODS or method == "cosine_plus_reverse":
        choices = tuple(m for m in METHODS if m != "cosine_plus_reverse")
        raise ConfigError(f"method={method!r}: choose one of {choices}")
    if isinstance(scores, nn.Module):
        if method != "random":
            raise ConfigError(
                f"select_neurons(model, method={method!r}) needs scores: pass score_neurons(...) or "
                "gradient_neuron_scores(...), or method='random'"
            )
        scores = random_scores(scores)
    if scores.scorer == "random" and method != "random":
        raise ConfigError(
            f"method={method!r} needs scores: pass score_neurons(...) or gradient_neuron_scores(...)"
        )
    if (budget is None) == (vectors is None):
        raise ConfigError("select_neurons: give one budget, budget=0.09 (or 'paper_9') or vectors=<count>")
    if vectors is not None:
        kind, value = "vectors", float(vectors)
    else:
        kind, value = "share", budget_share(budget)
    parameters = Budget(kind, value).parameters(scores.space, scores.total_parameters)
    ranked = scores.scores
    if method != "random":
        if (problem := separation_problem(scores.scores, scores.scorer)) is not None:
            logger.warning("%s", problem)
        if higher_is_selected(scores.scorer):  # select() takes the lowest first (the paper's cosine)
            ranked = {k: -v for k, v in scores.scores.items()}
    meta = {
        "model": scores.model,
        "budget": {"kind": kind, "value": value if vectors is None else int(vectors)},
        "scorer": None if method == "random" else scores.scorer,
        "total_parameters": scores.total_parameters,
    }
    if isinstance(budget, str):
        meta["budget"]["label"] = budget
    neuron_set = select(ranked, scores.space, parameters, method, pooling, seed, 0, meta)
    neuron_set.scores = {} if method == "random" else dict(scores.scores)  # as the scorer gave them
    return neuron_set


def random_scores(model: nn.Module, modules: Sequence[str] = DEFAULT_KINDS) -> NeuronScores:
    """Placeholder scores (all zero) for method="random", which ignores them."""
    space = NeuronSpace.from_model(model, modules)
    total = sum(p.numel() for p in model.parameters())
    return NeuronScores(
        {g.name: torch.zeros(g.count) for g in space.groups}, space, "random", total, _identity(model)
    )


def _identity(source: nn.Module | str | Path) -> dict[str, Any]:
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        return {"name_or_path": getattr(config, "_name_or_path", None) or None}
    return {"name_or_path": str(source)}
