"""LoRA through PEFT, with the paper's defaults: all linear layers but the LM head, alpha 16, dropout 0.

`adapter_dtype`: float32 (the default: PEFT's float32 adapters, each its own master copy) or bfloat16, the
authors' LoRA (baselines/train_with_lora.py, `get_accelerate_model`): the base loaded in bf16, then every LoRA
layer cast to bf16, every norm to float32 and the embeddings / LM head to bf16. Their prompt is
`task.prompt_style=authors_inst`; their whole row: `strategy=lora_authors task.prompt_style=authors_inst
model.dtype=bfloat16 optim.master_dtype=null` (docs/fidelity.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_dir
from neft_lab.neurons.selection import Budget, budget_share
from neft_lab.strategies.base import StrategyContext, TrainingStrategy

logger = logging.getLogger(__name__)

ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matched_rank(model: nn.Module, share: float) -> int:
    """The LoRA rank whose parameter count is closest to `share` of all the model's parameters (the paper's matching)."""
    from neft_lab.models.loading import parameter_count
    from neft_lab.neurons.selection import lora_parameter_count

    per_rank = lora_parameter_count(model, 1)
    rank = max(1, round(share * parameter_count(model) / per_rank))
    logger.info("LoRA rank %d matches a budget of %.2f%% of all parameters", rank, 100 * share)
    return rank


@contextmanager
def peft_sees_four_bit(model: nn.Module) -> Iterator[None]:
    """PEFT wraps a bitsandbytes layer in its QLoRA layer (`peft.tuners.lora.bnb.Linear4bit`) only when the model
    says it was loaded in 4 bits (`is_loaded_in_4bit`, set by transformers' quantized `from_pretrained`). Ours is
    quantized after loading (`model.quantization`), so it says so while PEFT wraps it, and no longer: the flag
    also changes how transformers counts, moves and saves the model."""
    from neft_lab.neurons.quantized import is_quantized

    if not any(is_quantized(m) for m in model.modules()) or hasattr(model, "is_loaded_in_4bit"):
        yield
        return
    model.is_loaded_in_4bit = True
    try:
        yield
    finally:
        del model.is_loaded_in_4bit


class LoraStrategy(TrainingStrategy):
    name = "lora"
    quantized_base = "before"  # QLoRA: the adapters sit on the 4-bit layers

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        bias: str = "none",
        merge_on_export: bool = False,
        adapter_dtype: str = "float32",
    ) -> None:
        if r != "match" and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
            raise ConfigError(
                f"strategy.r={r!r}: give a positive integer LoRA rank (e.g. strategy.r=8) or 'match'"
            )
        if adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(
                f"strategy.adapter_dtype={adapter_dtype!r}: choose float32 (the default) or bfloat16 (the authors' "
                "LoRA: adapters cast to bf16 over a bf16 base)"
            )
        self.adapter_dtype = adapter_dtype
        self.r, self.alpha, self.dropout, self.bias = r, alpha, dropout, bias
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.merge_on_export = merge_on_export

    def check_config(self, cfg: Any) -> None:
        """`strategy.r=match` reads the top-level `budget`: a share of all parameters in (0, 1]."""
        quantized = (cfg.get("model") or {}).get("quantization") if cfg is not None else None
        if quantized and self.merge_on_export:
            raise ConfigError(
                f"strategy.merge_on_export=true with model.quantization={quantized}: adapters cannot be merged "
                "into 4-bit weights; export the adapter (merge_on_export=false) and merge it into the unquantized "
                "base with stage=export"
            )
        if self.r == "match":
            Budget("share", budget_share(cfg.budget)).check("budget")
        if self.adapter_dtype != "float32":
            from neft_lab.training.precision import master_dtype

            master = cfg.optim.get("master_dtype") if cfg.get("optim") is not None else None
            if master_dtype(master) is not None:
                raise ConfigError(
                    f"strategy.adapter_dtype={self.adapter_dtype} with optim.master_dtype={master}: the float32 "
                    "masters would cast the adapters back to float32; set optim.master_dtype=null (the authors' "
                    "LoRA trains its bf16 adapters as they are)"
                )

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
            with peft_sees_four_bit(model):
                adapted = get_peft_model(model, config)
        except ValueError as err:  # PEFT's message for target modules that match nothing
            names = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise ConfigError(
                f"strategy.target_modules={self.target_modules} does not fit this model ({err}); "
                f"its linear layers are named {names}"
            ) from err
        if self.adapter_dtype != "float32":
            authors_casts(adapted, ADAPTER_DTYPES[self.adapter_dtype])
        kinds = Counter(
            f"{type(m).__module__}.{type(m).__name__}" for m in adapted.modules() if hasattr(m, "lora_A")
        )
        logger.info("%s", ", ".join(f"{n} LoRA layers: {kind}" for kind, n in kinds.items()))
        return adapted

    def summary(self, model: nn.Module, base_parameters: int) -> dict[str, Any]:
        return {
            **super().summary(model, base_parameters),
            "lora_r": self.r,
            "lora_adapter_dtype": self.adapter_dtype,
        }

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


@torch.no_grad()
def authors_casts(model: nn.Module, dtype: torch.dtype) -> None:
    """The casts of the authors' `get_accelerate_model` (baselines/train_with_lora.py) after `get_peft_model`:
    every LoRA layer (adapters and the wrapped base linear) to `dtype`, every module named `norm` to float32,
    and the LM head and input embeddings to `dtype` where they are float32."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.to(dtype)
        if "norm" in name:
            module.to(torch.float32)
        weight = getattr(module, "weight", None)
        is_edge = "lm_head" in name or "embed_tokens" in name
        if is_edge and isinstance(weight, torch.Tensor) and weight.dtype == torch.float32:
            module.to(dtype)
