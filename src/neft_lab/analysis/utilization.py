"""Utilization (the paper's §6.1): how strongly each neuron vector correlates with the hidden states
of an inference run, and the Rank that orders the vectors by it.

For a neuron vector w of layer l (length d_model) and a vector h of length d_model,
Pearson(w, h) = cos(w - mean(w), h - mean(h)) = ŵ · ĥ with ŵ, ĥ centred and unit-normalised.
Two statistics (`analysis.statistic`; docs/analysis.md compares them with the paper's text):

- `mean_state` (the authors' code, find_neuron/): per sentence the mean over its tokens of the RAW hidden
  state h_k, then mean_h_k = the mean over sentences of those sentence means, and r_k(w) = Pearson(w, mean_h_k):
  one correlation with the mean state per layer k;
- `token_mean` (neft_lab's earlier default): r_k(w) = the mean over all tokens t of Pearson(w, h_k,t)
  (= ŵ · mean_t ĥ_k,t).

The layers k (`analysis.layers`): `following` (the authors' code) = the OUTPUTS of decoder layers l..L-1,
Hugging Face's `output_hidden_states[1:]` (the last one after the final norm, as HF returns it);
`preceding` (the paper's text) = the INPUTS of layers 0..l, `output_hidden_states[0..l]` (h_0 = the
embeddings). The score combines r_k over those layers (`analysis.aggregation`): `max_abs` (the authors:
max |r|), `max` (signed max) or `mean`.

Both statistics stream: per layer the forward passes keep one running float64 sum of d_model numbers
(token_mean: of centred, unit-normalised states; mean_state: of per-sentence token means of raw states),
so memory does not grow with the number of sentences, and scoring every vector is one small matrix product
per matrix afterwards.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
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

STATISTICS = (
    "mean_state",
    "token_mean",
)  # Pearson with the mean state (the authors) | mean of per-token Pearson
LAYERS = (
    "following",
    "preceding",
)  # outputs of layers l..L-1 (the authors' code) | inputs of 0..l (the text)
AGGREGATIONS = ("max_abs", "max", "mean")  # how r_k combines over the layers k: max |r| (the authors) | ...
RANKINGS = ("per_kind", "pooled")  # Rank within each kind (the authors) | all kinds in one ranking
FORMAT = "neft_lab.utilization/1"


def check_choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {choices}")
    return value


# ---- the tokens: the model's own greedy output ----------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """`analysis.tokens=generated`: greedy decoding as the authors' model_infer_and_save_hs.py runs it."""

    max_new_tokens: int = 1024
    no_repeat_ngram_size: int = 4
    eos_ids: tuple[int, ...] | list[int] = ()


@torch.inference_mode()
def generate_sequences(
    model: nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    generation: Generation,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[int]]:
    """Each prompt followed by the model's greedy continuation, as the tokens generate() runs through: the
    prompt and every generated token but the last (the EOS, or the token that reached max_new_tokens, is
    never fed back, so it has no hidden state). Batches are left-padded for generation; the padding, and
    whatever a finished row receives while others continue, is cut off, so a sentence gets the same tokens
    at any batch size."""
    from transformers import GenerationConfig

    if not prompts:
        raise ConfigError("no sentences to run through the model (analysis.max_sentences, analysis.split)")
    device = next(model.parameters()).device
    eos = [int(e) for e in generation.eos_ids]
    # the model's own generation settings (cache kind, ...) with greedy decoding on top, as the authors ran it
    own = getattr(model, "generation_config", None)
    config = copy.deepcopy(own) if isinstance(own, GenerationConfig) else GenerationConfig()
    config.update(
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=generation.max_new_tokens,
        max_length=None,
        min_new_tokens=None,
        min_length=None,
        no_repeat_ngram_size=generation.no_repeat_ngram_size or None,
        eos_token_id=eos or None,
        pad_token_id=pad_id,
        output_hidden_states=False,
        return_dict_in_generate=False,
    )
    was_training = model.training
    model.eval()
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="sent")
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - len(prompts[i]) :] = 1
            result = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for r, i in enumerate(rows):
                new = result[r, width:].tolist()
                stop = next((t for t, token in enumerate(new) if token in eos), max(len(new) - 1, 0))
                out[i] = list(prompts[i]) + new[:stop]
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


# ---- the streaming pass over the data -----------------------------------------------------------------
class HiddenMeans:
    """Per layer k, the running float64 sum that the statistic needs (see the module's docstring)."""

    def __init__(
        self, num_layers: int, width: int, device: torch.device | str = "cpu", statistic: str = "mean_state"
    ) -> None:
        self.statistic = check_choice(statistic, STATISTICS, "analysis.statistic")
        self.sums = torch.zeros(num_layers, width, dtype=torch.float64, device=device)
        self.tokens = 0
        self.sentences = 0
        self.mask: torch.Tensor | None = None  # [batch, time] bool: the current batch's real tokens

    def add(self, layer: int, hidden: torch.Tensor) -> None:
        assert self.mask is not None
        if self.statistic == "token_mean":
            h = hidden[self.mask].to(torch.float64)  # [tokens, d]
            h = h - h.mean(dim=-1, keepdim=True)
            norm = h.norm(dim=-1, keepdim=True)
            # a constant hidden state has no defined correlation: it adds 0 (and still counts as a token)
            self.sums[layer] += (h / norm.clamp_min(torch.finfo(torch.float64).tiny)).sum(dim=0)
        else:  # each sentence's mean over its own tokens of the raw state; padding is weighted 0
            weights = self.mask.to(torch.float64)
            per_sentence = torch.einsum("bt,btd->bd", weights, hidden.to(torch.float64))
            self.sums[layer] += (per_sentence / weights.sum(dim=1, keepdim=True).clamp_min(1)).sum(dim=0)

    @property
    def means(self) -> torch.Tensor:
        """[L, d]: token_mean: mean_t ĥ_k,t; mean_state: mean over sentences of the sentence means of h_k."""
        return self.sums / max(self.tokens if self.statistic == "token_mean" else self.sentences, 1)


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


def layer_states(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, num_layers: int, layers: str
) -> tuple[torch.Tensor, ...]:
    """The L states the analysis reads, from Hugging Face's `output_hidden_states` of the decoder stack (no
    LM head): `preceding` → hidden_states[0..L-1] (the inputs of the layers), `following` →
    hidden_states[1..L] (their outputs, the last one after the final norm)."""
    backbone = getattr(model, "base_model", model)
    out = backbone(input_ids=input_ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    states = out.hidden_states
    if len(states) != num_layers + 1:
        raise ConfigError(
            f"the model returned {len(states)} hidden states for {num_layers} decoder layers "
            f"(expected {num_layers + 1}): cannot tell the layers apart"
        )
    return tuple(states[:num_layers]) if layers == "preceding" else tuple(states[1:])


@torch.inference_mode()
def hidden_means(
    model: nn.Module,
    space: NeuronSpace,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int = 8,
    desc: str = "utilization",
    progress: bool = True,
    statistic: str = "mean_state",
    layers: str = "following",
) -> HiddenMeans:
    """Run `sequences` through `model` (batched, right-padded) and accumulate the per-layer sums."""
    if not sequences:
        raise ConfigError("no sentences to run through the model (analysis.max_sentences, analysis.split)")
    check_choice(layers, LAYERS, "analysis.layers")
    device = next(model.parameters()).device
    num_layers = max(g.layer for g in space.groups) + 1
    stats = HiddenMeans(num_layers, space.groups[0].length, device, statistic)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(sequences), desc=desc, disable=not progress, unit="sent")
    try:
        for input_ids, mask in batches(sequences, batch_size, pad_id):
            stats.mask = mask.bool().to(device)
            states = layer_states(model, input_ids.to(device), mask.to(device), num_layers, layers)
            for k, hidden in enumerate(states):
                stats.add(k, hidden)
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


def targets(means: torch.Tensor, statistic: str) -> torch.Tensor:
    """[L, d]: what ŵ is dotted with to give r_k(w): token_mean: mean_t ĥ_k,t as it is; mean_state: the mean
    state centred and unit-normalised (ŵ · that = Pearson(w, mean_h_k))."""
    means = means.to(torch.float64)
    if statistic == "token_mean":
        return means
    centred = means - means.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def layer_span(group: VectorGroup, num_layers: int, layers: str) -> range:
    """The layers k whose states a vector of layer l is correlated with."""
    return range(group.layer + 1) if layers == "preceding" else range(group.layer, num_layers)


def layer_correlations(
    weight: torch.Tensor, group: VectorGroup, target: torch.Tensor, layers: str = "following"
) -> torch.Tensor:
    """[count, len(span)]: r_k(w) for the layers k of `layer_span`."""
    span = layer_span(group, target.shape[0], layers)
    rows = target[span.start : span.stop].to(weight.device, torch.float64)
    return unit_vectors(weight, group) @ rows.T


def score_vectors(
    weights: dict[str, torch.Tensor],
    space: NeuronSpace,
    means: torch.Tensor,
    aggregation: str = "max_abs",
    statistic: str = "mean_state",
    layers: str = "following",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Group → score of each vector, the layer k that gave it (argmax) and the signed r_k there."""
    check_choice(aggregation, AGGREGATIONS, "analysis.aggregation")
    check_choice(statistic, STATISTICS, "analysis.statistic")
    check_choice(layers, LAYERS, "analysis.layers")
    target = targets(means, statistic)
    scores, best, signed = {}, {}, {}
    for group in space.groups:
        if group.length != means.shape[1]:
            raise ConfigError(
                f"{group.weight}: vectors of length {group.length}, hidden states of {means.shape[1]}: "
                "only vectors of length d_model (up, down, gate, q, k, v, o) can be correlated"
            )
        corr = layer_correlations(weights[group.name], group, target, layers)
        top, where = (corr.abs() if aggregation == "max_abs" else corr).max(dim=1)
        at_best = corr.gather(1, where[:, None])[:, 0]
        scores[group.name] = (corr.mean(dim=1) if aggregation == "mean" else top).cpu()
        best[group.name] = (where + layer_span(group, means.shape[0], layers).start).to(torch.int32).cpu()
        signed[group.name] = at_best.cpu()
    return scores, best, signed


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
    """Rank within the vector's own kind (up among up vectors, down among down vectors): the authors'."""
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
    best_layer: dict[str, torch.Tensor]  # group → the layer k that gave the score (argmax)
    means: torch.Tensor  # [L, d]: the statistic's per-layer means (meta "statistic", "layers" say which)
    meta: dict[str, Any] = field(default_factory=dict)
    signed: dict[str, torch.Tensor] = field(default_factory=dict)  # group → signed r at best_layer (display)
    rank: dict[str, torch.Tensor] = field(init=False)  # all kinds pooled
    kind_rank: dict[str, torch.Tensor] = field(init=False)  # within each kind (the authors')

    def __post_init__(self) -> None:
        self.rank = ranks(self.scores, self.space.groups)
        self.kind_rank = kind_ranks(self.scores, self.space)
        if not self.signed:  # a table written before signed r was kept
            self.signed = dict(self.scores)

    @classmethod
    def measure(
        cls,
        model: nn.Module,
        sequences: list[list[int]],
        pad_id: int,
        kinds: Iterable[str] = ("up", "down"),
        aggregation: str = "max_abs",
        batch_size: int = 8,
        desc: str = "utilization",
        progress: bool = True,
        meta: dict[str, Any] | None = None,
        statistic: str = "mean_state",
        layers: str = "following",
        generation: Generation | None = None,
    ) -> UtilizationTable:
        """`sequences` are the sentences as they are read, or with `generation` the prompts that this model
        continues greedily first (analysis.tokens=generated)."""
        check_choice(aggregation, AGGREGATIONS, "analysis.aggregation")
        space = NeuronSpace.from_model(model, kinds)
        if generation is not None:
            sequences = generate_sequences(
                model, sequences, pad_id, generation, batch_size, progress, desc=f"{desc}: generating"
            )
        stats = hidden_means(model, space, sequences, pad_id, batch_size, desc, progress, statistic, layers)
        scores, best, signed = score_vectors(
            group_weights(model, space), space, stats.means, aggregation, statistic, layers
        )
        info = {
            "tokens": stats.tokens,
            "sentences": stats.sentences,
            "statistic": statistic,
            "layers": layers,
            "aggregation": aggregation,
            "generated": generation is not None,
        }
        return cls(space, scores, best, stats.means.cpu(), {**info, **(meta or {})}, signed)

    @property
    def num_vectors(self) -> int:
        return self.space.num_vectors

    def flat_scores(self) -> torch.Tensor:
        return flat(self.scores, self.space)

    def flat_ranks(self, ranking: str = "pooled") -> torch.Tensor:
        """Every vector's Rank, in the space's order: `pooled` (all kinds in one ranking) or `per_kind`."""
        check_choice(ranking, RANKINGS, "analysis.ranking")
        return flat(self.rank if ranking == "pooled" else self.kind_rank, self.space)

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
        """`<path>.safetensors` (score, signed, rank, kind_rank, best_layer per group; means) + `<path>.json`
        (summary)."""
        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"means": self.means.contiguous()}
        for name in self.scores:
            tensors[f"score.{name}"] = self.scores[name].contiguous()
            tensors[f"signed.{name}"] = self.signed[name].contiguous()
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
                    for p in ("score", "best_layer", "signed")}  # fmt: skip
            return cls(space, part["score"], part["best_layer"], tensors["means"], header.get("meta", {}),
                       part["signed"])  # fmt: skip
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
    from neft_lab.neurons.neuron_set import weight_shape

    shapes = {g["weight"]: weight_shape(meta["signature"][n], g["axis"]) for n, g in meta["groups"].items()}
    return NeuronSpace.from_shapes(meta["model_type"], shapes, meta["kinds"])
