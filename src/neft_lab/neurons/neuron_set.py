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
from neft_lab.integrity import HASH_KEY, check_content_hash, content_hash
from neft_lab.io import apply_umask, atomic_write_json
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
        """Refuse a space this set does not fit: the same architecture, the same number of layers, and every
        group of the set's kinds present in both with the same [vectors, length]. The message names the first
        difference."""
        difference = first_difference(self.space, space)
        if difference:
            identity = self.meta.get("model") or {}
            model = identity.get("name_or_path") or identity.get("name") or self.space.model_type
            raise ConfigError(
                f"this neuron set was chosen for {model} ({_describe(self.space)}), but {what} is "
                f"{space.model_type} ({_describe(space)}): {difference}; select neurons for this model instead "
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
        meta = {**self.metadata(), HASH_KEY: content_hash(tensors)}  # a flipped bit is refused on load
        tmp = base.with_name(f".{base.name}.safetensors.tmp")
        save_file(tensors, str(tmp), metadata={"neft_lab": json.dumps(meta, default=str)})
        apply_umask(tmp)  # safetensors writes 0600
        tmp.replace(base.with_suffix(".safetensors"))
        atomic_write_json(base.with_suffix(".json"), meta)
        return base.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> NeuronSet:
        file = neuron_set_file(path)
        from safetensors import SafetensorError, safe_open

        fix = "re-create it (rerun the selection, e.g. the run that saved it) or pick another file"
        try:
            with safe_open(str(file), framework="pt") as handle:
                header = (handle.metadata() or {}).get("neft_lab")
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"neuron set {file} is truncated or damaged ({err}): {fix}") from None
        if not header:
            raise ConfigError(f"{file} is not a neft_lab neuron set (no neft_lab metadata): {fix}")
        try:
            meta = json.loads(header)
            if not isinstance(meta, dict):
                raise TypeError("the metadata is not a mapping")
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"neuron set {file} has damaged metadata ({type(err).__name__}: {err}): {fix}"
            ) from None
        check_content_hash(tensors, meta.get(HASH_KEY), file, fix)
        try:
            space = NeuronSpace.from_shapes(
                meta["model_type"],
                {
                    g["weight"]: weight_shape(meta["signature"][name], g["axis"])
                    for name, g in meta["groups"].items()
                },
                meta["kinds"],
            )
            indices = {k.removeprefix("indices."): v for k, v in tensors.items() if k.startswith("indices.")}
            scores = {k.removeprefix("scores."): v for k, v in tensors.items() if k.startswith("scores.")}
            for name, idx in indices.items():  # safetensors checks sizes, not values: damaged data loads
                count = space.group(name).count
                if (
                    idx.dtype.is_floating_point
                    or idx.ndim != 1
                    or (
                        idx.numel()
                        and (
                            int(idx.min()) < 0
                            or int(idx.max()) >= count
                            or idx.unique().numel() != idx.numel()
                        )
                    )
                ):
                    raise ValueError(f"indices of {name} are not distinct vectors of 0..{count - 1}")
            indices = {
                name: idx for name, idx in indices.items() if idx.numel()
            }  # an empty group selects nothing
            if not indices:
                raise ConfigError(f"this neuron set selects no vectors (no indices in any group): {fix}")
            own = {k: v for k, v in meta.items() if k not in _DERIVED}
            return cls(space, indices, scores, own)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            if isinstance(err, ConfigError):
                raise ConfigError(f"{file}: {err}") from None
            raise ConfigError(
                f"neuron set {file} has damaged metadata ({type(err).__name__}: {err}): {fix}"
            ) from None


# metadata() keys that describe the space and counts; the rest is the set's own meta
_DERIVED = (
    "format",
    "model_type",
    "kinds",
    "signature",
    "groups",
    "vectors",
    "parameters",
    "per_layer",
    HASH_KEY,
)


def neuron_set_file(path: str | Path) -> Path:
    """The `.safetensors` file of a neuron set given with or without its suffix; it must exist."""
    file = _base(Path(str(path)).expanduser()).with_suffix(".safetensors")
    if not file.exists():
        raise ConfigError(
            f"neuron set {file} does not exist: check the path (selection.file / selection.files)"
        )
    return file


def first_difference(mine: NeuronSpace, theirs: NeuronSpace) -> str | None:
    """How `theirs` differs from `mine` over `mine`'s kinds, or None when a set of `mine` fits `theirs`."""
    if mine.model_type != theirs.model_type:
        return f"the architecture is {mine.model_type} in the set but {theirs.model_type} in the model"
    if mine.num_layers != theirs.num_layers:
        return f"the set has {mine.num_layers} layers, the model {theirs.num_layers}"
    kinds = set(mine.kinds)
    a = mine.signature()
    b = {g.name: [g.count, g.length] for g in theirs.groups if g.kind in kinds}
    for name, shape in a.items():  # layer by layer, in the set's kind order
        if name not in b:
            return f"{name} {shape} is in the set but not in the model"
        if b[name] != shape:
            return f"{name} is [vectors, length] {shape} in the set but {b[name]} in the model"
    extra = [name for name in b if name not in a]
    if extra:
        return f"{extra[0]} {b[extra[0]]} is in the model but not in the set"
    return None


def weight_shape(count_length: list[int], axis: int) -> tuple[int, int]:
    """A weight's shape from a group's stored [vectors, length] and its vector axis (0: rows are vectors)."""
    count, length = count_length
    return (count, length) if axis == 0 else (length, count)


def _base(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def _describe(space: NeuronSpace) -> str:
    first = space.groups[0]
    return f"{space.num_layers} layers, {first.count} vectors of {first.length} per {first.kind} matrix"
