"""Neuron sets compared (the paper's Table 6 and §6.4): overlap, IoU, and where in the model each set lies.

IoU(A, B) = |A ∩ B| / |A ∪ B|; overlap(A, B) = |A ∩ B| / min(|A|, |B|) (the paper's overlap for sets of
equal size, which stays meaningful when the budgets differ).
"""

from __future__ import annotations

from typing import Any

import torch

from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet


def flat_mask(neuron_set: NeuronSet, space: NeuronSpace | None = None) -> torch.Tensor:
    """The set as one boolean mask over `space` (default: its own), in the space's order."""
    space = space or neuron_set.space
    masks = neuron_set.masks()
    return torch.cat([masks.get(g.name, torch.zeros(g.count, dtype=torch.bool)) for g in space.groups])


def iou(a: NeuronSet, b: NeuronSet) -> float:
    a.check_same_space(b.space, "the other neuron set")
    ma, mb = flat_mask(a), flat_mask(b)
    union = int((ma | mb).sum())
    return int((ma & mb).sum()) / union if union else 1.0


def overlap_min(a: NeuronSet, b: NeuronSet) -> float:
    a.check_same_space(b.space, "the other neuron set")
    ma, mb = flat_mask(a), flat_mask(b)
    smaller = min(int(ma.sum()), int(mb.sum()))
    return int((ma & mb).sum()) / smaller if smaller else 1.0


def matrices(sets: dict[str, NeuronSet]) -> dict[str, Any]:
    """IoU, overlap and intersection sizes between every pair of `sets` (label → set)."""
    labels = list(sets)
    first = sets[labels[0]]
    for label in labels[1:]:
        first.check_same_space(sets[label].space, f"neuron set '{label}'")
    masks = [flat_mask(sets[label], first.space) for label in labels]
    sizes = [int(m.sum()) for m in masks]
    inter = [[int((a & b).sum()) for b in masks] for a in masks]
    n = len(labels)
    return {
        "labels": labels,
        "sizes": sizes,
        "intersection": inter,
        "iou": [
            [inter[i][j] / max(sizes[i] + sizes[j] - inter[i][j], 1) for j in range(n)] for i in range(n)
        ],
        "overlap": [[inter[i][j] / max(min(sizes[i], sizes[j]), 1) for j in range(n)] for i in range(n)],
    }


def per_layer(neuron_set: NeuronSet) -> dict[str, Any]:
    """Per kind and layer: selected vectors, their share of the layer's vectors, and (when the set has scores)
    the mean selection score of the selected and of all vectors."""
    masks = neuron_set.masks()
    out: dict[str, Any] = {"selected": {}, "share": {}, "mean_score_selected": {}, "mean_score_all": {}}
    for group in neuron_set.space.groups:
        mask = masks[group.name]
        out["selected"].setdefault(group.kind, []).append(int(mask.sum()))
        out["share"].setdefault(group.kind, []).append(float(mask.float().mean()))
        score = neuron_set.scores.get(group.name)
        if score is not None:
            chosen = score[mask].float()
            out["mean_score_selected"].setdefault(group.kind, []).append(
                float(chosen.mean()) if chosen.numel() else None
            )
            out["mean_score_all"].setdefault(group.kind, []).append(float(score.float().mean()))
    return {k: v for k, v in out.items() if v}
