"""Dense partial fine-tuning: whole weight matrices of a few named kinds train, everything else is frozen.

The paper's coarse baselines against NeFT are two of these (`conf/strategy/ft_embed.yaml`,
`conf/strategy/ft_in_out.yaml`):

- **FT-embed**: only the input embedding matrix (≈2% of Llama-2-7B);
- **FT-{in,out}**: every MLP `up_proj` and `down_proj` weight in full (≈41%), i.e. NeFT with
  every neuron vector selected.

The MLP and attention weights are found through `NeuronSpace` (the same weight-name table NeFT
uses, so Llama-family and GPT-2 Conv1D models work alike); the embedding through
`model.get_input_embeddings()`. The export is the plain Hugging Face folder of full fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import FAMILIES, NeuronSpace, family_of, model_type_of
from neft_lab.strategies.base import StrategyContext
from neft_lab.strategies.full import FullFineTuning

logger = logging.getLogger(__name__)

EMBED = "embed"
PARTS = (EMBED, "up", "down", "gate", "q", "k", "v", "o")


class PartialFineTuning(FullFineTuning):
    """Train the full weight matrices of the parts in `train` (`embed` and/or neuron kinds), freeze the rest.

    Subclasses `FullFineTuning` for its export: the result is a complete model, not a delta.
    """

    quantized_base = "after"  # the frozen parts in 4 bits, the trained weights as they are

    def __init__(self, name: str = "partial", train: Sequence[str] = (EMBED,)) -> None:
        if isinstance(train, str):  # `strategy.train=embed` on the command line
            train = [train]
        parts = list(dict.fromkeys(train))
        unknown = [p for p in parts if p not in PARTS]
        if not parts or unknown:
            raise ConfigError(
                f"strategy {name}: strategy.train={list(train)} must name one or more of {list(PARTS)} "
                f"(embed: the input embedding; up/down/gate: MLP weights; q/k/v/o: attention weights)"
                + (f"; unknown: {unknown}" if unknown else "")
            )
        super().__init__(train_embeddings=EMBED in parts)
        self.name = name
        self.train = parts

    def trained_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Name → parameter of every weight `train` names, in the model's parameter order."""
        wanted: set[int] = set()
        if EMBED in self.train:
            wanted.add(id(model.get_input_embeddings().weight))
        kinds = [p for p in self.train if p != EMBED]
        if kinds:
            model_type = model_type_of(model.config)
            available = FAMILIES[family_of(model_type)]
            missing = [k for k in kinds if k not in available]
            if missing:
                raise ConfigError(
                    f"strategy {self.name}: {model_type} models have no {missing} weights; "
                    f"strategy.train can name embed or {sorted(available)}"
                )
            space = NeuronSpace.from_model(model, kinds)
            absent = [k for k in kinds if k not in space.kinds]
            if absent:
                raise ConfigError(
                    f"strategy {self.name}: found no {absent} weights in this {model_type} model"
                )
            weights = {g.weight for g in space.groups}
            wanted |= {id(p) for n, p in model.named_parameters() if n in weights}
        # named_parameters yields a tied tensor once, under its first name (the input embedding's)
        return {n: p for n, p in model.named_parameters() if id(p) in wanted}

    def apply(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        trained = self.trained_parameters(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained)
        if EMBED in self.train and embedding_tied_to_head(model):
            logger.warning(
                "strategy %s: this model ties its input embedding to the LM head (tie_word_embeddings), "
                "so training the embedding also trains the output projection; the weights stay tied",
                self.name,
            )
        logger.info(
            "strategy %s trains %d weight tensors: %s", self.name, len(trained), _short(list(trained))
        )
        return model

    def summary(self, model: nn.Module, base_parameters: int) -> dict[str, Any]:
        out = {**super().summary(model, base_parameters), "trains": list(self.train)}
        if EMBED in self.train:
            out["embedding_tied_to_lm_head"] = embedding_tied_to_head(model)
        return out


def embedding_tied_to_head(model: nn.Module) -> bool:
    """Whether the LM head is the input embedding's very tensor (Gemma, GPT-2, the tiny models)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _short(names: list[str], keep: int = 4) -> str:
    return ", ".join(names[:keep]) + (f", … ({len(names) - keep} more)" if len(names) > keep else "")
