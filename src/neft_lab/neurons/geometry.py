"""Where the neurons are: the weight matrices whose rows or columns are NeFT's "neuron vectors".

A neuron is one MLP intermediate unit. It owns an input vector (its row of `up_proj`, or of
`gate_proj` when switched on) and an output vector (its column of `down_proj`); each vector is
scored and selected on its own. Attention projections can be added as an extension (rows of q/k/v,
columns of o). Geometry is read from weight names and shapes, so it works the same on a live model
and on a checkpoint on disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from neft_lab.errors import ConfigError

# family → kind → (weight-name pattern with the layer number as group 1, vector axis of the STORED weight, transposed?)
# "transposed" marks GPT-2's Conv1D, which stores [in, out] where nn.Linear stores [out, in].
FAMILIES: dict[str, dict[str, tuple[str, int, bool]]] = {
    "llama": {
        "up": (r"layers\.(\d+)\.mlp\.up_proj\.weight$", 0, False),
        "down": (r"layers\.(\d+)\.mlp\.down_proj\.weight$", 1, False),
        "gate": (r"layers\.(\d+)\.mlp\.gate_proj\.weight$", 0, False),
        "q": (r"layers\.(\d+)\.self_attn\.q_proj\.weight$", 0, False),
        "k": (r"layers\.(\d+)\.self_attn\.k_proj\.weight$", 0, False),
        "v": (r"layers\.(\d+)\.self_attn\.v_proj\.weight$", 0, False),
        "o": (r"layers\.(\d+)\.self_attn\.o_proj\.weight$", 1, False),
    },
    "gpt2": {
        "up": (r"\bh\.(\d+)\.mlp\.c_fc\.weight$", 1, True),
        "down": (r"\bh\.(\d+)\.mlp\.c_proj\.weight$", 0, True),
        "o": (r"\bh\.(\d+)\.attn\.c_proj\.weight$", 0, True),
    },
}
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": None,
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
    "gemma3": "llama",
    "olmo": "llama",
    "olmo2": "llama",
    "gpt2": "gpt2",
}
DEFAULT_KINDS = ("up", "down")


@dataclass(frozen=True)
class VectorGroup:
    """The neuron vectors of one weight matrix."""

    kind: str  # up | down | gate | q | k | v | o
    layer: int
    weight: str  # parameter name, e.g. "model.layers.3.mlp.up_proj.weight"
    axis: int  # axis of the stored weight that indexes the vectors
    count: int  # number of vectors
    length: int  # parameters per vector
    transposed: bool = False  # Conv1D storage ([in, out])

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def module(self) -> str:
        return self.weight.removesuffix(".weight")

    @property
    def linear_axis(self) -> int:
        """0 = rows (output units), 1 = columns (input units) of the weight in nn.Linear orientation [out, in]."""
        return 1 - self.axis if self.transposed else self.axis


@dataclass(frozen=True)
class NeuronSpace:
    """Every selectable vector of a model, in a fixed order (groups by layer, then kind)."""

    model_type: str
    groups: tuple[VectorGroup, ...]

    @classmethod
    def from_shapes(
        cls, model_type: str, shapes: Mapping[str, Iterable[int]], kinds: Iterable[str] = DEFAULT_KINDS
    ) -> NeuronSpace:
        """Build from parameter names → shapes (a model's `named_parameters` or a checkpoint's header)."""
        family = family_of(model_type)
        kinds = tuple(kinds)
        table = FAMILIES[family]
        unknown = [k for k in kinds if k not in table]
        if unknown:
            raise ConfigError(
                f"neuron kinds {unknown} are not available for {model_type} models; choose from {sorted(table)} "
                "(selection.modules)"
            )
        groups = []
        for name, shape in shapes.items():
            for kind in kinds:
                pattern, axis, transposed = table[kind]
                match = re.search(pattern, name)
                if match:
                    shape = tuple(shape)
                    groups.append(
                        VectorGroup(
                            kind, int(match.group(1)), name, axis, shape[axis], shape[1 - axis], transposed
                        )
                    )
        if not groups:
            raise ConfigError(
                f"found no {'/'.join(kinds)} weights in this {model_type} model: is it a decoder-only LM?"
            )
        order = {k: i for i, k in enumerate(kinds)}
        return cls(model_type, tuple(sorted(groups, key=lambda g: (g.layer, order[g.kind]))))

    @classmethod
    def from_model(cls, model, kinds: Iterable[str] = DEFAULT_KINDS) -> NeuronSpace:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        return cls.from_shapes(model_type_of(model.config), shapes, kinds)

    @property
    def num_vectors(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def num_parameters(self) -> int:
        return sum(g.count * g.length for g in self.groups)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.kind for g in self.groups))

    @property
    def num_layers(self) -> int:
        return len({g.layer for g in self.groups})

    def group(self, name: str) -> VectorGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(
            f"no vector group '{name}' in this model (groups: {', '.join(g.name for g in self.groups[:6])}, ...)"
        )

    def signature(self) -> dict[str, list[int]]:
        """Group → [count, length]: what a neuron set must match to fit a model."""
        return {g.name: [g.count, g.length] for g in self.groups}


def model_type_of(config) -> str:
    text_config = getattr(config, "text_config", None)
    return getattr(config, "model_type", None) or getattr(text_config, "model_type", "unknown")


def family_of(model_type: str) -> str:
    family = MODEL_TYPES.get(model_type)
    if family is None:
        supported = sorted(k for k, v in MODEL_TYPES.items() if v)
        raise ConfigError(
            f"NeFT does not know where the MLP neurons of '{model_type}' models are. Supported: {', '.join(supported)}. "
            "Add the architecture's weight-name patterns to neft_lab/neurons/geometry.py (FAMILIES, MODEL_TYPES)."
        )
    return family
