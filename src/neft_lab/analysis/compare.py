"""Two models' Ranks compared (the paper's §6.2–6.3): ΔRank, the neuron categories and the percentile buckets.

ΔRank(B vs A) = rank_B − rank_A for every vector (positive: it fell in the ranking, B uses it less).
Strongly affected: |ΔRank| ≥ threshold. Suppressed: strongly affected with ΔRank > 0 (promoted: < 0).
Indirectly affected: strongly affected but not in the trained set.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import _first_difference

PAPER_SHARE = 100_000 / 704_512  # 100,000 of Llama-2-7B's 32 layers x 11,008 x 2 vectors ≈ 0.142
DEFAULT_BUCKETS = (0, 1, 3, 5, 10, 25, 50, 75, 90, 95, 97, 99, 100)  # percent of the reference's ranking
CATEGORIES = ("strongly_affected", "suppressed", "promoted", "indirectly_affected")


def threshold_ranks(value: Any, num_vectors: int) -> int:
    """The threshold in ranks: a number < 1 is a share of all vectors, a number >= 1 a count of ranks."""
    good = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    if not good:
        raise ConfigError(
            f"analysis.threshold={value!r}: give a share of all vectors in (0, 1) (e.g. 0.142, the paper's "
            "100,000 of ~704k) or a count of ranks >= 1 (e.g. 10000)"
        )
    return max(1, round(value * num_vectors)) if value < 1 else int(value)


def check_buckets(edges: Any) -> list[float]:
    try:
        edges = [float(e) for e in edges] if not isinstance(edges, (str, bytes)) else []
    except (TypeError, ValueError):
        edges = []
    if len(edges) < 2 or edges[0] != 0 or edges[-1] != 100 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"analysis.buckets={edges}: give increasing percentiles from 0 to 100, "
            "e.g. analysis.buckets=[0,1,3,5,10,25,50,75,90,95,97,99,100]"
        )
    return edges


def check_same_space(a: NeuronSpace, b: NeuronSpace, what: str) -> None:
    difference = _first_difference(a, b) or _first_difference(b, a)
    if difference:
        raise ConfigError(f"{what} does not have the same neuron vectors as the reference: {difference}")


def delta_ranks(rank_a: torch.Tensor, rank_b: torch.Tensor) -> torch.Tensor:
    """rank_B − rank_A per vector (flat, the space's order)."""
    return rank_b.to(torch.int64) - rank_a.to(torch.int64)


def categories(
    delta: torch.Tensor, threshold: int, trained: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """Boolean masks over the vectors; `indirectly_affected` is None when the trained set is unknown."""
    strong = delta.abs() >= threshold
    return {
        "strongly_affected": strong,
        "suppressed": strong & (delta > 0),
        "promoted": strong & (delta < 0),
        "indirectly_affected": None if trained is None else strong & ~trained,
    }


def counts(mask: torch.Tensor, space: NeuronSpace) -> dict[str, Any]:
    """How many vectors of `mask` per kind and per layer of each kind."""
    per_kind: dict[str, int] = {}
    per_layer: dict[str, list[int]] = {}
    for group, part in zip(space.groups, mask.split([g.count for g in space.groups])):
        n = int(part.sum())
        per_kind[group.kind] = per_kind.get(group.kind, 0) + n
        per_layer.setdefault(group.kind, []).append(n)
    return {"total": int(mask.sum()), "per_kind": per_kind, "per_layer": per_layer}


def bucket_of(rank_a: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """The bucket of each vector by its percentile in the reference ranking (rank 1 = top = 0%)."""
    percentile = (rank_a.to(torch.float64) - 1) / len(rank_a) * 100
    return torch.bucketize(percentile, torch.tensor(edges[1:-1], dtype=torch.float64), right=True)


def bucket_means(delta: torch.Tensor, rank_a: torch.Tensor, edges: list[float]) -> list[dict[str, Any]]:
    """Avg(ΔRank) per bucket of the reference's Pearson-score percentiles (the paper's Figure 2)."""
    which = bucket_of(rank_a, edges)
    rows = []
    for i, (low, high) in enumerate(zip(edges, edges[1:])):
        part = delta[which == i].to(torch.float64)
        rows.append(
            {
                "from_percent": low,
                "to_percent": high,
                "vectors": int(part.numel()),
                "mean_delta_rank": float(part.mean()) if part.numel() else None,
                "mean_abs_delta_rank": float(part.abs().mean()) if part.numel() else None,
            }
        )
    return rows


def spearman(rank_a: torch.Tensor, rank_b: torch.Tensor) -> float:
    """Spearman's rho of two tie-free rankings: 1 − 6 Σ d² / (n (n² − 1))."""
    n = len(rank_a)
    d = (rank_a.to(torch.float64) - rank_b.to(torch.float64)).pow(2).sum()
    return float(1 - 6 * d / (n * (n * n - 1))) if n > 1 else 1.0


def compare(
    space: NeuronSpace,
    rank_a: torch.Tensor,
    rank_b: torch.Tensor,
    trained: torch.Tensor | None,
    threshold: int,
    edges: list[float] | tuple[float, ...] = DEFAULT_BUCKETS,
) -> dict[str, Any]:
    """Everything the paper reports about a pair of models, as plain numbers."""
    delta = delta_ranks(rank_a, rank_b)
    masks = categories(delta, threshold, trained)
    absolute = delta.abs().to(torch.float64)
    out: dict[str, Any] = {
        "vectors": len(delta),
        "threshold_ranks": threshold,
        "mean_delta_rank": float(delta.to(torch.float64).mean()),  # 0 up to rounding: ranks are a permutation
        "mean_abs_delta_rank": float(absolute.mean()),
        "median_abs_delta_rank": float(absolute.median()),
        "max_abs_delta_rank": int(absolute.max()),
        "spearman": spearman(rank_a, rank_b),
        "trained_vectors": None if trained is None else int(trained.sum()),
        "counts": {k: None if m is None else int(m.sum()) for k, m in masks.items()},
        "per_category": {k: counts(m, space) for k, m in masks.items() if m is not None},
        "buckets": bucket_means(delta, rank_a, list(edges)),
    }
    if trained is not None:
        out["mean_abs_delta_rank_trained"] = float(absolute[trained].mean()) if trained.any() else None
        out["mean_delta_rank_trained"] = (
            float(delta[trained].to(torch.float64).mean()) if trained.any() else None
        )
        out["mean_abs_delta_rank_untrained"] = float(absolute[~trained].mean()) if (~trained).any() else None
        strong = masks["strongly_affected"]
        out["share_of_trained_strongly_affected"] = (
            float((strong & trained).sum() / trained.sum()) if trained.any() else None
        )
    return out
