"""Score every neuron vector by how much a short full fine-tune moved it: signed cosine(base, reference).

Weights are read one matrix at a time, straight from safetensors on disk when given a folder, so
scoring two 7B checkpoints never holds two models in memory; the cosine itself is one vectorised
call per matrix, so the cost is reading the weights.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neft_lab.errors import ConfigError
from neft_lab.neurons import reference_weights
from neft_lab.neurons.geometry import NeuronSpace, model_type_of

logger = logging.getLogger(__name__)


class WeightSource:
    """Named weights of a live model, of a Hugging Face folder of safetensors or of a cached reference in
    compact form (`reference_weights`: only the matrices its scores were made from), loaded on demand."""

    def __init__(self, source: nn.Module | str | Path) -> None:
        self.label = str(source) if not isinstance(source, nn.Module) else type(source).__name__
        if isinstance(source, nn.Module):
            self._params = dict(source.named_parameters())
            self.model_type = model_type_of(source.config)
            self._files: dict[str, Path] = {}
            return
        folder = Path(source)
        self._params = {}
        if reference_weights.is_compact(folder) and not (folder / "config.json").exists():
            held = reference_weights.compact_metadata(folder)
            if held is None:
                raise ConfigError(
                    f"{folder / reference_weights.FILE} is damaged: delete {folder} to run the reference again"
                )
            self.model_type = str(held["model_type"])
            self._files = dict.fromkeys(held["tensors"], folder / reference_weights.FILE)
            return
        if not (folder / "config.json").exists():
            raise ConfigError(f"{folder} is not a Hugging Face model folder (no config.json)")
        self.model_type = model_type_of(_Config(json.loads((folder / "config.json").read_text())))
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                self._files = dict.fromkeys(handle.keys(), folder / "model.safetensors")
        else:
            raise ConfigError(f"{folder} holds no safetensors weights (model.safetensors or an index)")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._params:
            return {n: tuple(p.shape) for n, p in self._params.items()}
        from safetensors import safe_open

        shapes = {}
        for file in sorted(set(self._files.values())):
            with safe_open(str(file), framework="pt") as handle:
                shapes.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})  # noqa: SIM118
        return shapes

    def get(self, name: str) -> torch.Tensor:
        if self._params:
            if name not in self._params:
                raise ConfigError(f"{self.label} has no weight {name}")
            return self._params[name].detach().float()
        if name not in self._files:
            raise ConfigError(
                f"{self.label} has no weight {name}: is it a checkpoint of the same architecture?"
            )
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name).float()


class _Config:
    def __init__(self, raw: dict) -> None:
        self.model_type = raw.get("model_type")
        self.text_config = _Config(raw["text_config"]) if isinstance(raw.get("text_config"), dict) else None


def cosine_scores(
    base: WeightSource, reference: WeightSource, space: NeuronSpace, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Group name → signed cosine similarity of each vector between base and reference (low = moved)."""
    if base.model_type != reference.model_type:
        raise ConfigError(
            f"the reference checkpoint {reference.label} is a {reference.model_type} model but the base "
            f"is {base.model_type}: score a reference fine-tuned from the same base model"
        )
    scores = {}
    for group in tqdm(space.groups, desc="scoring neurons", disable=not progress, unit="matrix"):
        b, r = base.get(group.weight), reference.get(group.weight)
        if b.shape != r.shape:
            raise ConfigError(
                f"{group.weight} is {list(r.shape)} in the reference {reference.label} but "
                f"{list(b.shape)} in the base model: the reference is another architecture or size"
            )
        for tensor, label in ((b, base.label), (r, reference.label)):
            if not torch.isfinite(tensor).all():
                raise ConfigError(
                    f"{group.weight} of {label} contains NaN or inf: the checkpoint is broken "
                    "(a diverged reference fine-tune? lower selection.reference.lr)"
                )
        scores[group.name] = F.cosine_similarity(b, r, dim=1 - group.axis, eps=1e-12)
    flat = torch.cat(list(scores.values()))
    logger.info(
        "scored %d vectors: cosine min %.4f, median %.4f, max %.4f",
        flat.numel(),
        float(flat.min()),
        float(flat.median()),
        float(flat.max()),
    )
    if math.isclose(float(flat.min()), 1.0, abs_tol=1e-7):
        logger.warning(
            "every vector has cosine 1: the reference did not move (did the reference fine-tune train?)"
        )
    return scores


# The setting that makes each scorer's scores more telling (named by the warning below).
RAISE_TO_SEPARATE = {
    "cosine": "selection.reference.steps (the reference run's K; the paper: 3,200) or selection.reference.lr",
    "lora_reference": "selection.reference.steps (the reference run's K) or selection.lora_reference.lr",
    "gradient": "selection.gradient.batches",
    "probe": "selection.probe.max_examples",
    "activation_ridge": "selection.activation_ridge.max_examples",
}
COSINE_SCORERS = ("cosine", "lora_reference")  # scores in [-1, 1]: their spread is absolute
MIN_SPREAD = 5e-5  # below it the scores look alike at 4 decimals (cosine 1.0000 … 1.0000)
MAX_TIED = 0.5  # most vectors sharing their score with another: float resolution, not the data, orders them


def separation_problem(scores: dict[str, torch.Tensor], scorer: str) -> str | None:
    """Why these scores cannot tell the vectors apart (nearly all alike, or most tied), or None when they can.

    A reference run of a few steps (debug=fast: 4) barely moves any vector: every cosine is 1.0000 and the
    vectors chosen among them are as good as random. Scorers other than the cosine ones are judged relative
    to their largest magnitude."""
    values = [v.detach().flatten().float() for v in scores.values() if v.numel()]
    if not values:
        return None
    flat = torch.cat(values)
    if flat.numel() < 2 or not torch.isfinite(flat).all():
        return None  # non-finite scores are refused where they are read
    low, high, median = float(flat.min()), float(flat.max()), float(flat.median())
    scale = 1.0 if scorer in COSINE_SCORERS else max(abs(low), abs(high))
    tied = 1.0 - torch.unique(flat).numel() / flat.numel()
    if high - low > MIN_SPREAD * scale and tied <= MAX_TIED:
        return None
    setting = RAISE_TO_SEPARATE.get(scorer, "the scorer's amount of data")
    return (
        f"the {scorer} scores cannot separate the vectors (min {low:.4f}, median {median:.4f}, max {high:.4f} over "
        f"{flat.numel():,} vectors, {100 * tied:.0f}% tied): the selection among them is close to random. "
        f"Raise {setting}"
    )
