"""The choices of the training settings, as plain names: validation checks a config against them without
importing torch or Lightning (a typo is refused in about a second), and the training code maps them."""

from __future__ import annotations

from neft_lab.errors import ConfigError

CLIP_SCOPES = (
    "selected",
    "paper",
)  # optim.clip_scope: what the clipping norm is measured over (training.module)
LOSS_AVERAGES = (
    "rank",
    "global",
)  # optim.loss_average: each process's own token mean | the step's mean over every process's tokens (training.module)
SCHEDULES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
}  # → transformers' names
EVAL_PRECISIONS = ("auto", "32", "bf16", "16")  # eval.precision (evaluation.evaluate maps them to dtypes)


def check_master_dtype(name: str | None) -> bool:
    """`optim.master_dtype`: True for float32 masters (the default), False for none (train in the model's
    dtype); refuses anything else."""
    if name in (None, "null", "none", "model"):
        return False
    if name in ("float32", "fp32"):
        return True
    raise ConfigError(
        f"optim.master_dtype={name!r}: choose float32 (trainable tensors kept in float32, the paper's "
        "setting) or null (train in the model's dtype)"
    )
