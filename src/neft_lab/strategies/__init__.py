"""Strategies by name: `strategy=<name>` picks one; `_target_` plugs in a class of your own."""

from __future__ import annotations

from typing import Any

from neft_lab.errors import ConfigError
from neft_lab.strategies.base import StrategyContext, TrainingStrategy
from neft_lab.strategies.full import FullFineTuning
from neft_lab.strategies.lora import LoraStrategy
from neft_lab.strategies.neft import NeftStrategy

REGISTRY: dict[str, type[TrainingStrategy]] = {
    "full": FullFineTuning,
    "lora": LoraStrategy,
    "neft": NeftStrategy,
    "random_neuron": NeftStrategy,
    "reverse_selection": NeftStrategy,
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
    if cls is NeftStrategy:
        params["name"] = name
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"strategy '{name}': {err}") from err
