"""LoRA through PEFT, with the paper's defaults: all linear layers but the LM head, alpha 16, dropout 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_dir
from neft_lab.neurons.selection import Budget, budget_share
from neft_lab.strategies.base import StrategyContext, TrainingStrategy

logger = logging.getLogger(__name__)


def matched_rank(model: nn.Module, share: float) -> int:
    """The LoRA rank whose parameter count is closest to `share` of all the model's parameters (the paper's matching)."""
    from neft_lab.models.loading import parameter_count
    from neft_lab.neurons.selection import lora_parameter_count

    per_rank = lora_parameter_count(model, 1)
    rank = max(1, round(share * parameter_count(model) / per_rank))
    logger.info("LoRA rank %d matches a budget of %.2f%% of all parameters", rank, 100 * share)
    return rank


class LoraStrategy(TrainingStrategy):
    name = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        bias: str = "none",
        merge_on_export: bool = False,
    ) -> None:
        if r != "match" and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
            raise ConfigError(
                f"strategy.r={r!r}: give a positive integer LoRA rank (e.g. strategy.r=8) or 'match'"
            )
        self.r, self.alpha, self.dropout, self.bias = r, alpha, dropout, bias
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.merge_on_export = merge_on_export

    def check_config(self, cfg: Any) -> None:
        """`strategy.r=match` reads the top-level `budget`: a share of all parameters in (0, 1]."""
        if self.r == "match":
            Budget("share", budget_share(cfg.budget)).check("budget")

    def apply(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        if self.r == "match":
            self.r = matched_rank(model, budget_share(ctx.cfg.budget))
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            bias=self.bias,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # PEFT's message for target modules that match nothing
            names = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise ConfigError(
                f"strategy.target_modules={self.target_modules} does not fit this model ({err}); "
                f"its linear layers are named {names}"
            ) from err

    def summary(self, model: nn.Module, base_parameters: int) -> dict[str, Any]:
        return {**super().summary(model, base_parameters), "lora_r": self.r}

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """The adapter (small) by default; a merged full checkpoint with merge_on_export=true."""
        with atomic_dir(out_dir) as tmp:
            if self.merge_on_export:
                model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        return out_dir

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.get_base_model() if hasattr(model, "get_base_model") else model
