"""Which dtype each tensor trains in: float32 masters for everything that trains, whatever the frozen base's dtype.

AdamW at the paper's lr 2e-5 moves a weight by about 2e-5 per step; a bfloat16 weight near 0.05 has a
spacing of 2.4e-4, so stored in bfloat16 most updates round away (on the tiny model, bf16-mixed,
lr 2e-5, 20 steps: ~31% of the selected entries changed at all). The authors load float32 and train
under bf16 autocast. Here every *trainable* tensor is kept in float32 — it is its own master copy —
while frozen weights may stay in the model's dtype (bfloat16 saves half of their memory):

- NeFT fused: the slice parameter is float32; `sync` writes it, rounded, into the live bf16 weight.
- NeFT delta: the zero-initialised delta is float32 and is cast to the compute dtype in the forward.
- full / FT-embed / FT-{in,out} / masked NeFT: the trained weights themselves become float32, as in the
  authors' float32 load (a separate bf16 live copy would only add memory).
- LoRA: PEFT already keeps its adapters in float32.

`optim.master_dtype=null` trains every tensor in the model's dtype instead (half the optimizer memory,
lossy updates) — a documented departure, never the default. The cast itself: `neft_lab.masters.keep_trainable_in`
(shared with the library).
"""

from __future__ import annotations

import torch

from neft_lab.errors import ConfigError
from neft_lab.training.options import check_master_dtype

HALF = (torch.bfloat16, torch.float16)
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")
TRUE_HALF_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "half")


def master_dtype(name: str | None) -> torch.dtype | None:
    """`optim.master_dtype` as a dtype: float32 (the default) or None (train in the model's dtype)."""
    return torch.float32 if check_master_dtype(name) else None


def check_precision(model_dtype: str, trainer_precision: str | int, master: str | None) -> None:
    """Refuse the combinations that cannot train as configured, before any model is loaded.

    A half-precision model next to float32 masters needs autocast (`bf16-mixed`), which casts each
    layer's inputs to one dtype; Lightning's `*-true` precisions convert the whole module, masters included.
    """
    precision = str(trainer_precision)
    half_model = model_dtype in ("bfloat16", "bf16", "float16", "fp16")
    if master_dtype(master) is not None and precision in TRUE_HALF_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} converts every weight, the float32 masters included, to half "
            "precision: use trainer.precision=bf16-mixed (float32 masters, bf16 compute), or "
            "optim.master_dtype=null to train in half precision on purpose"
        )
    if half_model and master_dtype(master) is not None and precision not in MIXED_PRECISIONS:
        raise ConfigError(
            f"model.dtype={model_dtype} with float32 master weights trains under autocast: set "
            f"trainer.precision=bf16-mixed (now {precision}), or model.dtype=float32"
        )
