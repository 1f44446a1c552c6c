"""Utilization (the paper's §6.1): how strongly each neuron vector correlates with the hidden states
that reach its layer during inference, and the Rank that orders every vector by it.

For a neuron vector w of layer l (length d_model) and a residual-stream hidden state h,
Pearson(w, h) = cos(w - mean(w), h - mean(h)) = ŵ · ĥ with ŵ, ĥ centred and unit-normalised.
The score of w is, over the "preceding layers" j = 0..l (h_0 = embeddings, h_j = the input of
decoder layer j), the MAX over j of the MEAN over all non-padding tokens t of Pearson(w, h_j,t).

Because mean_t (ŵ · ĥ_t) = ŵ · mean_t ĥ_t, the forward passes only keep, per layer, the running sum
of centred, unit-normalised hidden states (L vectors of d_model, float64): memory does not grow with
the number of sentences, and scoring every vector is one small matrix product per matrix afterwards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from neft_lab.errors import ConfigError
from neft_lab.io import apply_umask, atomic_write_json
from neft_lab.neurons.geometry import NeuronSpace, VectorGroup

AGGREGATIONS = ("max", "max_abs", "mean")  # how the per-layer token means combine over layers 0..l
FORMAT = "neft_lab.utilization/1"


class _Enough(Exception):
    """Raised by the last layer's hook: its input is the last hidden state needed (no head, no logits)."""


# ---- the streaming pass over the data -----------------------------------------------------------------
def decoder_layers(model: nn.Module, space: NeuronSpace) -> list[nn.Module]:
    """The decoder layer modules 0..L-1, found from the neuron weights' names (`model.layers.3.mlp.up_proj`
    → `model.layers.3`), so any family geometry.py knows works, wrapped or not."""
    names: dict[int, str] = {}
    for group in space.groups:
        match = re.match(r"(.*?\b(?:layers|h)\.\d+)\.", group.weight)
        if match is None:
            raise ConfigError(f"cannot tell which decoder layer {group.weight} belongs to")
        names[group.layer] = match.group(1)
    missing = [i for i in range(max(names) + 1) if i not in names]
    if missing:
        raise ConfigError(f"no neuron weights found for decoder layers {missing}")
    return [model.get_submodule(names[i]) for i in range(len(names))]


class HiddenMeans:
    """Per decoder layer j, the running sum over non-padding tokens of centred, unit-normalised h_j."""

    def __init__(self, num_layers: int, width: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(num_layers, width, dtype=torch.float64, device=device)
        self.tokens = 0
        self.sentences = 0
        self.mask: torch.Tensor | None = None  # [batch, time] bool: the current batch's real tokens

    def add(self, layer: int, hidden: torch.Tensor) -> None:
        assert self.mask is not None
        h = hidden[self.mask].to(torch.float64)  # [tokens, d]
        h = h - h.mean(dim=-1, keepdim=True)
        norm = h.norm(dim=-1, keepdim=True)
        # a constant hidden state has no defined correlation: it adds 0 (and still counts as a token)
        self.sums[layer] += (h / norm.clamp_min(torch.finfo(torch.float64).tiny)).sum(dim=0)

    @property
    def means(self) -> torch.Tensor:
        """[L, d]: mean_t ĥ_j,t per layer."""
        return self.sums / max(self.tokens, 1)

    @contextmanager
    def hooks(self, layers: list[nn.Module]) -> Iterator[None]:
        """Forward pre-hooks that read each layer's input; the last one stops the forward pass."""

        def hook(index: int):
            def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.add(index, hidden)
                if index == len(layers) - 1:
                    raise _Enough

            return pre

        handles = [
            layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Right-padded (input_ids, attention_mask), longest first so a batch wastes little on padding."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        rows = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, : len(ids)] = 1
        yield input_ids, mask


@torch.inference_mode()
def hidden_means(
    model: nn.Module,
    space: NeuronSpace,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int = 8,
    desc: str = "utilization",
    progress: bool = True,
) -> HiddenMeans:
    """Run `sequences` through `model` (batched, right-padded) and accumulate the per-layer means."""
    if not sequences:
        raise ConfigError("no sentences to run through the model (analysis.max_sentences, analysis.split)")
    layers = decoder_layers(model, space)
    device = next(model.parameters()).device
    stats = HiddenMeans(len(layers), space.groups[0].length, device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(sequences), desc=desc, disable=not progress, unit="sent")
    try:
        with stats.hooks(layers):
            for input_ids, mask in batches(sequences, batch_size, pad_id):
                stats.mask = mask.bool().to(device)
                with suppress(_Enough):
                    model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                stats.tokens += int(mask.sum())
                stats.sentences += len(input_ids)
                bar.update(len(input_ids))
    finally:
        bar.close()
        model.train(was_training)
    return stats


# ---- scoring the vectors ------------------------------------------------------------------------------
def unit_vectors(weight: torch.Tensor, group: VectorGroup) -> torch.Tensor:
    """[count, d_model]: the group's neuron vectors, centred and unit-normalised (float64)."""
    vectors = weight.detach().to(torch.float64)
    vectors = vectors if group.axis == 0 else vectors.T
    vectors = vectors - vectors.mean(dim=-1, keepdim=True)
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def layer_correlations(weight: torch.Tensor, group: VectorGroup, means: torch.Tensor) -> torch.Tensor:
    """[count, l+1]: mean_t Pearson(w, h_j,t) for j = 0..l of the group's layer l."""
    return unit_vectors(weight, group) @ means[: group.layer + 1].to(weight.device, torch.float64).T


def score_vectors(
    weights: dict[str, torch.Tensor], space: NeuronSpace, means: torch.Tensor, aggregation: str = "max"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Group → utilization score of each vector, and the preceding layer that gave it (argmax)."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"analysis.aggregation={aggregation!r}: choose one of {AGGREGATIONS}")
    scores, best = {}, {}
    for group in space.groups:
        if group.length != means.shape[1]:
            raise ConfigError(
                f"{group.weight}: vectors of length {group.length}, hidden states of {means.shape[1]}: "
                "only vectors of length d_model (up, down, gate, q, k, v, o) can be correlated"
            )
        corr = layer_correlations(weights[group.name], group, means)
        if aggregation == "max_abs":
            corr = corr.abs()
        top, where = corr.max(dim=1)
        scores[group.name] = (corr.mean(dim=1) if aggregation == "mean" else top).cpu()
        best[group.name] = where.to(torch.int32).cpu()
    return scores, best


def group_weights(model: nn.Module, space: NeuronSpace) -> dict[str, torch.Tensor]:
    return {g.name: model.get_parameter(g.weight) for g in space.groups}


# ---- Rank -----------------------------------------------------------------------------------------------
def ranks(scores: dict[str, torch.Tensor], groups: Iterable[VectorGroup]) -> dict[str, torch.Tensor]:
    """Rank of every vector among `groups` pooled: descending score, 1 = highest, ties keep the space's
    order (layer, kind, index)."""
    groups = list(groups)
    flat = torch.cat([scores[g.name].to(torch.float64) for g in groups])
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    return dict(zip([g.name for g in groups], rank.split([g.count for g in groups])))


def kind_ranks(scores: dict[str, torch.Tensor], space: NeuronSpace) -> dict[str, torch.Tensor]:
    """Rank within the vector's own kind (up among up vectors, down among down vectors)."""
    out: dict[str, torch.Tensor] = {}
    for kind in space.kinds:
        out.update(ranks(scores, [g for g in space.groups if g.kind == kind]))
    return out


def flat(values: dict[str, torch.Tensor], space: NeuronSpace) -> torch.Tensor:
    """One tensor over all vectors, in the space's order."""
    return torch.cat([values[g.name] for g in space.groups])


# ---- the table --------------------------------------------------------------------------------------------
@dataclass
class UtilizationTable:
    """The utilization of one model's vectors over one set of sentences."""

    space: NeuronSpace
    scores: dict[str, torch.Tensor]  # group → float64 score per vector
    best_layer: dict[str, torch.Tensor]  # group → the preceding layer j of the max
    means: torch.Tensor  # [L, d]: mean_t ĥ_j,t (lets other weights be scored against these states)
    meta: dict[str, Any] = field(default_factory=dict)
    rank: dict[str, torch.Tensor] = field(init=False)
    kind_rank: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.rank = ranks(self.scores, self.space.groups)
        self.kind_rank = kind_ranks(self.scores, self.space)

    @classmethod
    def measure(
        cls,
        model: nn.Module,
        sequences: list[list[int]],
        pad_id: int,
        kinds: Iterable[str] = ("up", "down"),
        aggregation: str = "max",
        batch_size: int = 8,
        desc: str = "utilization",
        progress: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> UtilizationTable:
        space = NeuronSpace.from_model(model, kinds)
        stats = hidden_means(model, space, sequences, pad_id, batch_size, desc, progress)
        scores, best = score_vectors(group_weights(model, space), space, stats.means, aggregation)
        info = {"tokens": stats.tokens, "sentences": stats.sentences, "aggregation": aggregation}
        return cls(space, scores, best, stats.means.cpu(), {**info, **(meta or {})})

    @property
    def num_vectors(self) -> int:
        return self.space.num_vectors

    def flat_scores(self) -> torch.Tensor:
        return flat(self.scores, self.space)

    def flat_ranks(self) -> torch.Tensor:
        return flat(self.rank, self.space)

    def per_layer(self) -> dict[str, list[float]]:
        """kind → mean score of its vectors per layer."""
        out: dict[str, list[float]] = {}
        for group in self.space.groups:
            out.setdefault(group.kind, []).append(float(self.scores[group.name].mean()))
        return out

    def summary(self, top: int = 10) -> dict[str, Any]:
        scores = self.flat_scores()
        names = [(g.name, i) for g in self.space.groups for i in range(g.count)]
        best = torch.topk(scores, min(top, len(scores))).indices.tolist()
        quantiles = torch.quantile(
            scores, torch.tensor([0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0], dtype=scores.dtype)
        )
        return {
            **self.meta,
            "vectors": self.num_vectors,
            "kinds": list(self.space.kinds),
            "score_mean": float(scores.mean()),
            "score_quantiles": dict(
                zip(("min", "p1", "p25", "p50", "p75", "p99", "max"), quantiles.tolist())
            ),
            "per_layer_mean_score": self.per_layer(),
            "top": [{"group": names[i][0], "index": names[i][1], "score": float(scores[i])} for i in best],
        }

    # ---- files ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """`<path>.safetensors` (score, rank, kind_rank, best_layer per group; means) + `<path>.json` (summary)."""
        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"means": self.means.contiguous()}
        for name in self.scores:
            tensors[f"score.{name}"] = self.scores[name].contiguous()
            tensors[f"rank.{name}"] = self.rank[name].contiguous()
            tensors[f"kind_rank.{name}"] = self.kind_rank[name].contiguous()
            tensors[f"best_layer.{name}"] = self.best_layer[name].contiguous()
        header = {"format": FORMAT, "space": space_meta(self.space), "meta": self.meta}
        tmp = base.with_name(f".{base.name}.safetensors.tmp")
        save_file(tensors, str(tmp), metadata={"neft_lab": json.dumps(header, default=str)})
        apply_umask(tmp)
        tmp.replace(base.with_suffix(".safetensors"))
        atomic_write_json(base.with_suffix(".json"), self.summary())
        return base.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> UtilizationTable:
        file = Path(path).with_suffix(".safetensors")
        try:
            with safe_open(str(file), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("neft_lab", "{}"))
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - not a dict
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT}")
            space = space_from_meta(header["space"])
            part = {p: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{p}.")}
                    for p in ("score", "best_layer")}  # fmt: skip
            return cls(space, part["score"], part["best_layer"], tensors["means"], header.get("meta", {}))
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(
                f"{file} is not a readable utilization table ({err}): rerun stage=analyze"
            ) from None


def space_meta(space: NeuronSpace) -> dict[str, Any]:
    """What rebuilds a NeuronSpace (as a neuron set's header stores it)."""
    return {
        "model_type": space.model_type,
        "kinds": list(space.kinds),
        "signature": space.signature(),
        "groups": {g.name: {"weight": g.weight, "axis": g.axis} for g in space.groups},
    }


def space_from_meta(meta: dict[str, Any]) -> NeuronSpace:
    from neft_lab.neurons.neuron_set import _shape

    shapes = {g["weight"]: _shape(meta["signature"][n], g["axis"]) for n, g in meta["groups"].items()}
    return NeuronSpace.from_shapes(meta["model_type"], shapes, meta["kinds"])
