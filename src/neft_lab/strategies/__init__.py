"""Strategies by name: `strategy=<name>` picks one; `_target_` plugs in a class of your own."""

from __future__ import annotations

from typing import Any

from neft_lab.errors import ConfigError
from neft_lab.strategies.base import StrategyContext, TrainingStrategy
from neft_lab.strategies.full import FullFineTuning
from neft_lab.strategies.lora import LoraStrategy
from neft_lab.strategies.neft import NeftStrategy
from neft_lab.strategies.partial import PartialFineTuning

REGISTRY: dict[str, type[TrainingStrategy]] = {
    "full": FullFineTuning,
    "lora": LoraStrategy,
    "neft": NeftStrategy,
    "random_neuron": NeftStrategy,
    "reverse_selection": NeftStrategy,
    "ft_embed": PartialFineTuning,  # the paper's FT-embed: the input embedding only
    "ft_in_out": PartialFineTuning,  # the paper's FT-{in,out}: every MLP up_proj and down_proj weight
}

__all__ = ["REGISTRY", "StrategyContext", "TrainingStrategy", "build_strategy"]


def build_strategy(cfg: Any) -> TrainingStrategy:
    from omegaconf import DictConfig, OmegaConf

    params = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = params.pop("name", None)
    target = params.pop("_target_", None)
    if target:
        from hydra.utils import get_class

        cls = get_class(target)
    elif name in REGISTRY:
        cls = REGISTRY[name]
    else:
        raise ConfigError(
            f"unknown strategy '{name}': choose one of {sorted(REGISTRY)} or give strategy._target_"
        )
    if cls in (NeftStrategy, PartialFineTuning):  # one class behind several names: it records which
        params["name"] = name
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"strategy '{name}': {err}") from err
