"""Turn scores into a neuron set under a parameter budget: cosine (the paper), reverse, random, and mixes.

The paper pools the scores of every layer and both vector kinds, sorts ascending, and keeps the
lowest-similarity vectors until the budget — a share of *all* model parameters — is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet

METHODS = ("cosine", "reverse", "random", "cosine_plus_reverse")

# The paper's budgets are counts of Llama-2-7B's 4096-long vectors: "NeFT 9%" = 150,000 vectors =
# 614.4M parameters = 9.118% of its 6,738,415,616 parameters (a share of 0.09 gives 148,060 vectors).
# `budget=paper_<label>` asks for the share of all parameters that its count is on Llama-2-7B (on another
# model the same share of that model's parameters). The counts are a table, not a proportion of 150,000:
# Table 7's parameter counts / 4096 (0.4% = 25.6M, 1.5% = 102.4M, 3% = 204.8M, 6% = 409.6M, 9% = 614.4M,
# 12% = 819.2M) and, for the Figure 3/4 points the table lacks, the authors' code
# (find_neuron/visualization/main.py: cos-12.5w = "NeFT7%", cos-17.5w = "NeFT10%", Reversed 7.5w = "Reversed4%").
PAPER_POINTS = {
    "0.4": 6_250,
    "1.5": 25_000,
    "3": 50_000,
    "4": 75_000,
    "6": 100_000,
    "7": 125_000,
    "9": 150_000,
    "10": 175_000,
    "12": 200_000,
}
LLAMA2_7B_PARAMETERS = 6_738_415_616
LLAMA2_7B_VECTOR_LENGTH = 4096
BUDGET_KINDS = ("share", "lora_rank", "vectors")
POOLINGS = ("global", "per_layer")


def budget_share(value: Any) -> float:
    """A budget as a share of all parameters: a number (0.09) or a paper point (`paper_9`, see PAPER_POINTS)."""
    if isinstance(value, str) and value.startswith("paper_"):
        return paper_point_vectors(value) * LLAMA2_7B_VECTOR_LENGTH / LLAMA2_7B_PARAMETERS
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"budget={value!r}: give a share of all parameters (0.09 for 9%) or a paper point (paper_9)"
        ) from None


def paper_point_vectors(value: str) -> int:
    """The vector count of a paper point such as `paper_9` (150,000); an unknown point is refused."""
    label = value[len("paper_") :]
    try:
        number = float(label)
    except ValueError:
        number = None
    for known, vectors in PAPER_POINTS.items():
        if number is not None and float(known) == number:
            return vectors
    listed = ", ".join(f"paper_{k} ({v:,} vectors)" for k, v in PAPER_POINTS.items())
    raise ConfigError(
        f"budget={value}: not one of the paper's budget points, which are {listed}; "
        "give one of them or a share of all parameters (e.g. budget=0.05)"
    )


@dataclass(frozen=True)
class Budget:
    kind: str  # share: of all model parameters | lora_rank: as many parameters as LoRA of that rank | vectors
    value: float

    def check(self, key: str = "selection.budget.value") -> None:
        """The checks that need no model: a known kind and a value in range (`key` names it in messages)."""
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(
                f"selection.budget.kind={self.kind!r}: unknown budget kind, choose one of {BUDGET_KINDS}"
            )
        if not self.value > 0:
            raise ConfigError(f"{key}={self.value}: a budget must be > 0, e.g. 0.09 (9% of all parameters)")
        if self.kind == "share" and self.value > 1:
            raise ConfigError(
                f"{key}={self.value} is above 1: a budget share is a share of all parameters, e.g. 0.09 for 9%"
            )
        if self.kind in ("lora_rank", "vectors") and not float(self.value).is_integer():
            raise ConfigError(f"{key}={self.value}: a budget of kind {self.kind} must be a whole number >= 1")

    def parameters(self, space: NeuronSpace, total_parameters: int, model: nn.Module | None = None) -> int:
        """The budget in parameters, checked against what the neuron space can hold."""
        self.check()
        if self.kind == "share":
            params = round(self.value * total_parameters)
        elif self.kind == "lora_rank":
            if model is None:
                raise ConfigError("a budget given as a LoRA rank needs the model to count LoRA's parameters")
            params = lora_parameter_count(model, int(self.value))
        else:
            params = int(self.value) * _vector_length(space)
        if params > space.num_parameters:
            raise ConfigError(
                f"budget {self.kind}={self.value} is {params:,} parameters, more than the {space.num_parameters:,} "
                f"of all selectable vectors ({space.num_vectors:,} {'/'.join(space.kinds)} vectors = "
                f"{space.num_parameters / max(total_parameters, 1):.1%} of the model). Lower the budget or add kinds "
                "(selection.modules)."
            )
        if params < _vector_length(space):
            raise ConfigError(f"budget {self.kind}={self.value} is {params} parameters: less than one vector")
        return params


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"selection.pooling={pooling!r}: unknown pooling, choose one of {POOLINGS}")


def lora_parameter_count(model: nn.Module, rank: int) -> int:
    """Parameters of LoRA rank `rank` on all linear layers but the LM head (PEFT's `all-linear`)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for module in model.modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):
            total += rank * sum(module.weight.shape)
    return total


def _vector_length(space: NeuronSpace) -> int:
    return min(g.length for g in space.groups)


def _flat(
    scores: dict[str, torch.Tensor], space: NeuronSpace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate scores in space order; also each vector's group number and parameter count."""
    missing = [g.name for g in space.groups if g.name not in scores]
    if missing:
        raise ConfigError(f"scores are missing for {missing[:4]}: score the same kinds you select")
    flat = torch.cat([scores[g.name].float().flatten() for g in space.groups])
    group_ids = torch.cat([torch.full((g.count,), i) for i, g in enumerate(space.groups)])
    lengths = torch.cat([torch.full((g.count,), g.length) for g in space.groups])
    return flat, group_ids, lengths


def _take(order: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """The longest prefix of `order` whose vectors fit in `budget` parameters."""
    used = torch.cumsum(lengths[order], 0)
    return order[used <= budget]


def _rank(method: str, flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if method == "cosine":  # lowest similarity first: moved most by the reference fine-tune
        return torch.sort(flat, stable=True).indices
    if method == "reverse":
        return torch.sort(flat, descending=True, stable=True).indices
    if method == "random":
        return torch.randperm(flat.numel(), generator=generator)
    raise ConfigError(f"unknown selection method '{method}': choose one of {METHODS}")


def select(
    scores: dict[str, torch.Tensor],
    space: NeuronSpace,
    budget_parameters: int,
    method: str = "cosine",
    pooling: str = "global",
    seed: int = 0,
    reverse_parameters: int = 0,
    meta: dict[str, Any] | None = None,
) -> NeuronSet:
    """Pick vectors under the budget. `cosine_plus_reverse` spends `budget_parameters` on the lowest and
    `reverse_parameters` more on the highest similarities (the paper's "NeFT x% + Reversed y%")."""
    check_pooling(pooling)
    flat, group_ids, lengths = _flat(scores, space)
    generator = torch.Generator().manual_seed(seed)
    if pooling == "global":
        chosen = _choose(method, flat, lengths, budget_parameters, reverse_parameters, generator)
    else:  # the same share of every layer's vectors
        layers = torch.tensor([space.groups[int(g)].layer for g in group_ids])
        chosen_parts = []
        layer_ids = sorted(set(layers.tolist()))
        unit = _vector_length(space)  # split whole vectors, so the layers' parts add up to the global budget
        sizes = [int((layers == layer).sum()) for layer in layer_ids]
        shares = [n * unit for n in _split(budget_parameters // unit, sizes)]
        reverse_shares = [n * unit for n in _split(reverse_parameters // unit, sizes)]
        for layer, share, reverse_share in zip(layer_ids, shares, reverse_shares):
            members = (layers == layer).nonzero().squeeze(-1)
            picked = _choose(method, flat[members], lengths[members], share, reverse_share, generator)
            chosen_parts.append(members[picked])
        chosen = torch.cat(chosen_parts)
    indices: dict[str, torch.Tensor] = {}
    offsets = torch.cumsum(torch.tensor([0] + [g.count for g in space.groups]), 0)
    for i, group in enumerate(space.groups):
        mine = chosen[group_ids[chosen] == i] - offsets[i]
        if mine.numel():
            indices[group.name] = mine
    info = {
        "method": method,
        "pooling": pooling,
        "seed": seed,
        "budget_parameters": budget_parameters,
        "reverse_parameters": reverse_parameters,
        **(meta or {}),
    }
    return NeuronSet(space, indices, dict(scores), info)


def _choose(
    method: str,
    flat: torch.Tensor,
    lengths: torch.Tensor,
    budget: int,
    reverse_budget: int,
    generator: torch.Generator,
) -> torch.Tensor:
    if method == "cosine_plus_reverse":
        low = _take(_rank("cosine", flat, generator), lengths, budget)
        rest = torch.ones_like(flat, dtype=torch.bool)
        rest[low] = False
        high_order = _rank("reverse", flat, generator)
        high = _take(high_order[rest[high_order]], lengths, reverse_budget)
        return torch.cat([low, high])
    if reverse_budget:
        raise ConfigError("selection.reverse_share only applies to method=cosine_plus_reverse")
    return _take(_rank(method, flat, generator), lengths, budget)


def _split(total: int, sizes: list[int]) -> list[int]:
    """Split `total` proportionally to `sizes` (largest remainder), so the parts add up exactly."""
    whole = sum(sizes)
    raw = [total * s / whole for s in sizes]
    parts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts
