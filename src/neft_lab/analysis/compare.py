"""Two models' Ranks compared (the paper's §6.2–6.3): ΔRank, the neuron categories and the buckets.

ΔRank(B vs A) = rank_B − rank_A for every vector (positive: it fell in the ranking, B uses it less), with
the ranks of `analysis.ranking`: `per_kind` (the authors: up among up, down among down) or `pooled`.
Strongly affected: |ΔRank| ≥ the threshold of the vector's kind. Suppressed: strongly affected with
ΔRank > 0 (promoted: < 0). Indirectly affected: strongly affected but not in the trained set.
Avg ΔRank (the authors'): the mean over kinds of each kind's mean |ΔRank|.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import first_difference

# the authors' "strongly affected": |ΔRank| >= 100,000 within a kind's ranking of Llama-2-7B's 32 x 11,008 =
# 352,256 vectors, ≈ 0.2839 of the kind
PAPER_SHARE = 100_000 / 352_256
PAPER_BUCKETS = (0, 1, 3, 10, 30, 50, 70, 90, 97, 99, 100)  # Figure 2: % of the kind's max score (max_score)
DEFAULT_BUCKETS = PAPER_BUCKETS
BUCKET_SCALES = ("max_score", "percentile")  # % of the kind's max score (the authors) | rank percentile
CATEGORIES = ("strongly_affected", "suppressed", "promoted", "indirectly_affected")


def threshold_ranks(value: Any, num_vectors: int) -> int:
    """The threshold in ranks: a number < 1 is a share of `num_vectors` (a kind's, or all of them when
    ranks are pooled), a number >= 1 a count of ranks."""
    good = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    if not good:
        raise ConfigError(
            f"analysis.threshold={value!r}: give a share of the ranking in (0, 1) (e.g. 0.283884, the authors' "
            "100,000 of a kind's 352,256) or a count of ranks >= 1 (e.g. 10000)"
        )
    return max(1, round(value * num_vectors)) if value < 1 else int(value)


def kind_thresholds(value: Any, space: NeuronSpace, ranking: str = "per_kind") -> dict[str, int]:
    """Kind → threshold in ranks: a share of the kind's vectors (`per_kind`) or of all vectors (`pooled`)."""
    out = {}
    for kind in space.kinds:
        size = (
            sum(g.count for g in space.groups if g.kind == kind)
            if ranking == "per_kind"
            else space.num_vectors
        )
        out[kind] = threshold_ranks(value, size)
    return out


def _per_vector(values: dict[str, Any], space: NeuronSpace, dtype: torch.dtype) -> torch.Tensor:
    """A value per kind spread over the vectors, in the space's order."""
    return torch.cat([torch.full((g.count,), values[g.kind], dtype=dtype) for g in space.groups])


def _kind_index(space: NeuronSpace) -> dict[str, torch.Tensor]:
    """Kind → a boolean mask over the vectors (the space's order)."""
    kinds = [g.kind for g in space.groups for _ in range(g.count)]
    return {k: torch.tensor([x == k for x in kinds], dtype=torch.bool) for k in space.kinds}


def check_buckets(edges: Any) -> list[float]:
    try:
        edges = [float(e) for e in edges] if not isinstance(edges, (str, bytes)) else []
    except (TypeError, ValueError):
        edges = []
    if len(edges) < 2 or edges[0] != 0 or edges[-1] != 100 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"analysis.buckets={edges}: give increasing percentages from 0 to 100, "
            "e.g. analysis.buckets=[0,1,3,10,30,50,70,90,97,99,100]"
        )
    return edges


def check_same_space(a: NeuronSpace, b: NeuronSpace, what: str) -> None:
    difference = first_difference(a, b) or first_difference(b, a)
    if difference:
        raise ConfigError(f"{what} does not have the same neuron vectors as the reference: {difference}")


def delta_ranks(rank_a: torch.Tensor, rank_b: torch.Tensor) -> torch.Tensor:
    """rank_B − rank_A per vector (flat, the space's order)."""
    return rank_b.to(torch.int64) - rank_a.to(torch.int64)


def categories(
    delta: torch.Tensor, threshold: int | torch.Tensor, trained: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """Boolean masks over the vectors; `threshold` is one number or one per vector; `indirectly_affected` is
    None when the trained set is unknown."""
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


def bucket_position(
    space: NeuronSpace,
    rank_a: torch.Tensor,
    scale: str = "percentile",
    scores_a: torch.Tensor | None = None,
    ranking: str = "per_kind",
) -> torch.Tensor:
    """Each vector's place in the reference, in percent: `percentile` = (rank − 1) / size of its ranking ×
    100 (0 = top); `max_score` = its score / the largest score of its kind × 100 (the authors' Figure 2:
    100 = the kind's most utilized vector; scores below 0 count as 0)."""
    if scale == "max_score":
        if scores_a is None:
            raise ConfigError("analysis.bucket_scale=max_score needs the reference's scores")
        scores = scores_a.to(torch.float64)
        top = torch.zeros_like(scores)
        for mask in _kind_index(space).values():
            top[mask] = scores[mask].max()
        return (scores / top.clamp_min(torch.finfo(torch.float64).tiny) * 100).clamp(0, 100)
    sizes = {k: int(m.sum()) if ranking == "per_kind" else len(rank_a) for k, m in _kind_index(space).items()}
    return (rank_a.to(torch.float64) - 1) / _per_vector(sizes, space, torch.float64) * 100


def bucket_of(position: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """The bucket of each vector by its position in percent (edges from 0 to 100; 100 is in the last)."""
    return torch.bucketize(position, torch.tensor(edges[1:-1], dtype=torch.float64), right=True)


def bucket_means(delta: torch.Tensor, position: torch.Tensor, edges: list[float]) -> list[dict[str, Any]]:
    """Avg(ΔRank) per bucket of the reference's position (the paper's Figure 2)."""
    which = bucket_of(position, edges)
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
    threshold: int | dict[str, int],
    edges: list[float] | tuple[float, ...] = DEFAULT_BUCKETS,
    *,
    ranking: str = "per_kind",
    scores_a: torch.Tensor | None = None,
    bucket_scale: str | None = None,
) -> dict[str, Any]:
    """Everything the paper reports about a pair of models, as plain numbers. `threshold`: ranks, one number
    or one per kind; `bucket_scale` defaults to max_score when the reference's scores are given."""
    scale = bucket_scale or ("max_score" if scores_a is not None else "percentile")
    if scale not in BUCKET_SCALES:
        raise ConfigError(f"analysis.bucket_scale={scale!r}: choose one of {BUCKET_SCALES}")
    delta = delta_ranks(rank_a, rank_b)
    per_kind_threshold = threshold if isinstance(threshold, dict) else dict.fromkeys(space.kinds, threshold)
    thresholds = _per_vector(per_kind_threshold, space, torch.int64)
    masks = categories(delta, thresholds, trained)
    absolute = delta.abs().to(torch.float64)
    kinds = _kind_index(space)
    per_kind_mean = {k: float(absolute[m].mean()) for k, m in kinds.items()}
    per_kind_spearman = {k: spearman(rank_a[m], rank_b[m]) for k, m in kinds.items()}
    shown_threshold = (
        next(iter(per_kind_threshold.values()))
        if len(set(per_kind_threshold.values())) == 1
        else dict(per_kind_threshold)
    )
    out: dict[str, Any] = {
        "vectors": len(delta),
        "ranking": ranking,
        "threshold_ranks": shown_threshold,  # one number, or kind → ranks when the kinds' differ
        "mean_delta_rank": float(delta.to(torch.float64).mean()),  # 0 up to rounding: ranks are a permutation
        "mean_abs_delta_rank": float(absolute.mean()),  # over all vectors
        "mean_abs_delta_rank_per_kind": per_kind_mean,
        "avg_delta_rank": sum(per_kind_mean.values()) / len(per_kind_mean),  # the authors': mean over kinds
        "median_abs_delta_rank": float(absolute.median()),
        "max_abs_delta_rank": int(absolute.max()),
        "spearman": (
            spearman(rank_a, rank_b) if ranking == "pooled" else sum(per_kind_spearman.values()) / len(kinds)
        ),
        "spearman_per_kind": per_kind_spearman,
        "trained_vectors": None if trained is None else int(trained.sum()),
        "counts": {k: None if m is None else int(m.sum()) for k, m in masks.items()},
        "per_category": {k: counts(m, space) for k, m in masks.items() if m is not None},
        "bucket_scale": scale,
        "buckets": bucket_means(delta, bucket_position(space, rank_a, scale, scores_a, ranking), list(edges)),
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
        out["trained_per_kind"] = {
            k: _trained_vs_untrained(absolute[m], trained[m], strong[m]) for k, m in kinds.items()
        }
    return out


def _trained_vs_untrained(
    absolute: torch.Tensor, trained: torch.Tensor, strong: torch.Tensor
) -> dict[str, Any]:
    """Within one kind: how far its trained and its untrained vectors moved, and how often each is strongly
    affected (NeFT's set may be nearly all one kind, a random set is not: pooled numbers would mix the kinds)."""

    def mean(values: torch.Tensor) -> float | None:
        return float(values.to(torch.float64).mean()) if len(values) else None

    return {
        "trained_vectors": int(trained.sum()),
        "mean_abs_delta_rank_trained": mean(absolute[trained]),
        "mean_abs_delta_rank_untrained": mean(absolute[~trained]),
        "share_of_trained_strongly_affected": mean(strong[trained]),
        "share_of_untrained_strongly_affected": mean(strong[~trained]),
    }
