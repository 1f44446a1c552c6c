"""A neuron set: which vectors of which weight matrices train, with their scores and how they were chosen.

One small artifact flows from scoring to selection to training to analysis. On disk it is a pair:
`<name>.safetensors` (indices and scores per group, metadata in the header) and `<name>.json`
(the same metadata, readable). Loading it into a model it was not chosen for fails loudly.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_write_json
from neft_lab.neurons.geometry import NeuronSpace

FORMAT_VERSION = 1


@dataclass
class NeuronSet:
    space: NeuronSpace
    indices: dict[str, torch.Tensor]  # group name ("up.3") → sorted unique vector indices
    scores: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # group name → score of every vector (optional)
    meta: dict[str, Any] = field(default_factory=dict)  # method, budget, reference steps, model identity, ...

    def __post_init__(self) -> None:
        for name, idx in list(self.indices.items()):
            group = self.space.group(name)
            idx = torch.as_tensor(idx, dtype=torch.long).unique(sorted=True)
            if idx.numel() and (idx[0] < 0 or idx[-1] >= group.count):
                raise ConfigError(
                    f"neuron set: indices of {name} must lie in [0, {group.count}), got {idx[0]}..{idx[-1]}"
                )
            self.indices[name] = idx

    @property
    def num_vectors(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def num_parameters(self) -> int:
        return sum(int(i.numel()) * self.space.group(n).length for n, i in self.indices.items())

    def per_layer(self) -> dict[str, dict[int, int]]:
        """kind → layer → number of selected vectors."""
        counts: dict[str, Counter] = {}
        for name, idx in self.indices.items():
            group = self.space.group(name)
            counts.setdefault(group.kind, Counter())[group.layer] += int(idx.numel())
        return {kind: dict(sorted(c.items())) for kind, c in counts.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        """Group → boolean mask over its vectors."""
        out = {}
        for group in self.space.groups:
            mask = torch.zeros(group.count, dtype=torch.bool)
            if group.name in self.indices:
                mask[self.indices[group.name]] = True
            out[group.name] = mask
        return out

    def summary(self, total_parameters: int | None = None) -> dict[str, Any]:
        out = {
            "vectors": self.num_vectors,
            "parameters": self.num_parameters,
            "share_of_mlp_vectors": self.num_vectors / max(self.space.num_vectors, 1),
            "per_layer": self.per_layer(),
        }
        if total_parameters:
            out["share_of_all_parameters"] = self.num_parameters / total_parameters
        return out

    # ---- set algebra: transfer and union experiments -------------------------------------------------------
    def _combine(self, other: NeuronSet, op: str) -> NeuronSet:
        self.check_same_space(other.space, "the other neuron set")
        a, b = self.masks(), other.masks()
        result = {n: (a[n] | b[n] if op == "union" else a[n] & b[n]).nonzero().squeeze(-1) for n in a}
        meta = {
            "method": op,
            "parents": [self.meta.get("method"), other.meta.get("method")],
            "model": self.meta.get("model"),
        }
        return NeuronSet(self.space, {n: i for n, i in result.items() if i.numel()}, meta=meta)

    def union(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "union")

    def intersection(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "intersection")

    def overlap(self, other: NeuronSet) -> float:
        """|A ∩ B| / |A|: the paper's overlap between sets of equal size."""
        return self.intersection(other).num_vectors / max(self.num_vectors, 1)

    # ---- fitting a model ---------------------------------------------------------------------------------
    def check_same_space(self, space: NeuronSpace, what: str = "this model") -> None:
        mine, theirs = self.space.signature(), space.signature()
        if self.space.model_type != space.model_type or any(
            theirs.get(n) != s for n, s in mine.items() if n in self.indices
        ):
            identity = self.meta.get("model") or {}
            model = identity.get("name_or_path") or identity.get("name") or self.space.model_type
            raise ConfigError(
                f"this neuron set was chosen for {model} ({_describe(self.space)}), but {what} is "
                f"{space.model_type} ({_describe(space)}): select neurons for this model instead "
                "(or pass the neuron set of the right model)."
            )

    # ---- files -------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "model_type": self.space.model_type,
            "kinds": list(self.space.kinds),
            "signature": self.space.signature(),
            "groups": {
                g.name: {"weight": g.weight, "axis": g.axis, "transposed": g.transposed}
                for g in self.space.groups
            },
            "vectors": self.num_vectors,
            "parameters": self.num_parameters,
            "per_layer": self.per_layer(),
            **self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` and `<path>.json` atomically; returns the safetensors path."""
        base = _base(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"indices.{n}": i.contiguous() for n, i in self.indices.items()}
        tensors.update({f"scores.{n}": s.float().contiguous() for n, s in self.scores.items()})
        meta = self.metadata()
        tmp = base.with_name(f".{base.name}.safetensors.tmp")
        save_file(tensors, str(tmp), metadata={"neft_lab": json.dumps(meta, default=str)})
        tmp.replace(base.with_suffix(".safetensors"))
        atomic_write_json(base.with_suffix(".json"), meta)
        return base.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> NeuronSet:
        file = _base(path).with_suffix(".safetensors")
        if not file.exists():
            raise ConfigError(f"neuron set {file} does not exist")
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            header = (handle.metadata() or {}).get("neft_lab")
        if not header:
            raise ConfigError(f"{file} is not a neft_lab neuron set (no neft_lab metadata)")
        meta = json.loads(header)
        tensors = load_file(str(file))
        space = NeuronSpace.from_shapes(
            meta["model_type"],
            {g["weight"]: _shape(meta["signature"][name], g["axis"]) for name, g in meta["groups"].items()},
            meta["kinds"],
        )
        indices = {k.removeprefix("indices."): v for k, v in tensors.items() if k.startswith("indices.")}
        scores = {k.removeprefix("scores."): v for k, v in tensors.items() if k.startswith("scores.")}
        own = {
            k: v
            for k, v in meta.items()
            if k
            not in (
                "format",
                "model_type",
                "kinds",
                "signature",
                "groups",
                "vectors",
                "parameters",
                "per_layer",
            )
        }
        return cls(space, indices, scores, own)


def _shape(count_length: list[int], axis: int) -> tuple[int, int]:
    count, length = count_length
    return (count, length) if axis == 0 else (length, count)


def _base(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def _describe(space: NeuronSpace) -> str:
    first = space.groups[0]
    return f"{space.num_layers} layers, {first.count} vectors of {first.length} per {first.kind} matrix"
