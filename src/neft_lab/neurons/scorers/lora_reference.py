"""Score neuron vectors by how far a short LoRA fine-tune moved them: cosine(base, base + B·A).

The cosine scorer's reference is a full fine-tune (16 bytes per parameter with AdamW); a LoRA run on
all linear layers costs the memory of a LoRA run instead. Its merged weights ``W + s·B·A`` play the
reference's part, and the vectors are scored exactly as before, by `neurons.scoring.cosine_scores`.

The reference can be a merged Hugging Face folder (``merge_and_unload`` + ``save_pretrained``), or
the live PEFT model itself: `LoraWeights` merges it one matrix at a time, ``W + Σ get_delta_weight``
as PEFT's own ``merge`` does, without writing into the model. ``copy.deepcopy(peft).merge_and_unload()``
would give the same weights but holds a second copy of the whole model; merging in place would
change the base model that PEFT wraps (and that the pipeline trains NeFT on afterwards).

Direction: LOW cosine = moved = selected first (`HIGHER_IS_SELECTED` is False), as for cosine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.scoring import WeightSource, cosine_scores

HIGHER_IS_SELECTED = False  # cosine similarity: the least similar (most moved) vectors first

Source = WeightSource | nn.Module | str | Path


class LoraWeights(WeightSource):
    """The weights of a live PEFT LoRA model, base + LoRA (`merge=True`) or base alone, one matrix at a time.

    Takes the `PeftModel` or the model PEFT injected its layers into; names are the plain model's
    (``model.layers.0.mlp.up_proj.weight``, not ``...up_proj.base_layer.weight``). Nothing is written.
    """

    def __init__(self, model: nn.Module, merge: bool = True) -> None:
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        super().__init__(root)
        self.root, self.merge = root, merge
        self.label = f"{'LoRA-merged' if merge else 'LoRA base of'} {type(root).__name__}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            name.replace(".base_layer.", "."): shape
            for name, shape in super().shapes().items()
            if ".lora_" not in name
        }

    def lora_layer(self, name: str) -> Any | None:
        """The LoRA layer that holds weight `name`, or None where the weight is not LoRA-trained."""
        from peft.tuners.lora import LoraLayer

        try:
            module = self.root.get_submodule(name.removesuffix(".weight"))
        except AttributeError:
            return None
        return module if isinstance(module, LoraLayer) and name.endswith(".weight") else None

    def get(self, name: str) -> torch.Tensor:
        layer = self.lora_layer(name)
        if layer is None:
            return super().get(name)
        weight = layer.get_base_layer().weight.detach().float()
        merged = set(layer.merged_adapters)
        for adapter in layer.active_adapters if self.merge else sorted(merged):
            if adapter not in layer.lora_A or (self.merge and adapter in merged):
                continue
            if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter):
                raise ConfigError(
                    f"{name} uses a LoRA variant (e.g. DoRA) in adapter '{adapter}', whose merge is not W + B·A: "
                    "merge it with merge_and_unload(), save_pretrained() the result and score that folder"
                )
            delta = layer.get_delta_weight(adapter).detach().float()
            weight = weight + delta if self.merge else weight - delta
        return weight


def lora_reference_scores(
    base: Source, merged: Source, space: NeuronSpace | None = None, *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Group name → cosine(base vector, LoRA-merged vector) (LOW = moved = selected first).

    `merged`: a live PEFT LoRA model (merged one matrix at a time by `LoraWeights`), a merged model,
    a merged Hugging Face folder or a `WeightSource`. `base`: the base model or its folder; the PEFT
    model itself works too (its frozen base weights are read). `space` defaults to the base's up/down
    vectors.
    """
    base_source, merged_source = _source(base, merge=False), _source(merged, merge=True)
    if space is None:
        space = NeuronSpace.from_shapes(base_source.model_type, base_source.shapes())
    if isinstance(merged_source, LoraWeights) and not any(
        merged_source.lora_layer(g.weight) is not None for g in space.groups
    ):
        raise ConfigError(
            "the LoRA reference trains none of the scored matrices "
            f"({', '.join(sorted({g.weight.rsplit('.', 2)[-2] for g in space.groups}))}): "
            "train it on all linear layers (target_modules='all-linear')"
        )
    return cosine_scores(base_source, merged_source, space, progress=progress)


def _source(source: Source, merge: bool) -> WeightSource:
    if isinstance(source, WeightSource):
        return source
    if isinstance(source, nn.Module) and _has_lora(source):
        return LoraWeights(source, merge=merge)
    return WeightSource(source)


def _has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in model.modules())
