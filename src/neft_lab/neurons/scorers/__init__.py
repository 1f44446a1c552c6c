"""Scorers beyond the cosine of a full fine-tune: each turns a model (and task data) into per-vector scores.

Every scorer returns the same shape as `neurons.scoring.cosine_scores`: group name (``"up.3"``) →
a 1-D float tensor with one score per vector of that group. They differ in direction, which
`HIGHER_IS_SELECTED` records per scorer (each module also exports its own constant):

- ``cosine`` (`neurons.scoring`): cosine(base, full fine-tune); LOW = moved = selected first.
- ``lora_reference``: cosine(base, base + LoRA); LOW = moved = selected first.
- ``gradient``: empirical Fisher (mean squared loss gradient) per vector; HIGH = selected first.
- ``probe`` (the paper's §3.1 probe): max |cosine| of the vector with the ridge-probe directions fitted on
  each layer's mean-pooled residual hidden states of a labelled task; HIGH = selected first.
- ``activation_ridge`` (this project's, formerly ``probe``): |ridge-probe weight| of the neuron's mean-pooled
  MLP activation; HIGH = selected first.

The submodules import nothing from `neft_lab.pipeline`, so they can be imported anywhere.
"""

from __future__ import annotations

from neft_lab.errors import ConfigError

HIGHER_IS_SELECTED: dict[str, bool] = {
    "cosine": False,
    "lora_reference": False,
    "gradient": True,
    "probe": True,
    "activation_ridge": True,
}


def higher_is_selected(scorer: str) -> bool:
    """Whether `scorer`'s highest scores are its most important vectors (else its lowest are)."""
    if scorer not in HIGHER_IS_SELECTED:
        raise ConfigError(f"unknown scorer '{scorer}': choose one of {sorted(HIGHER_IS_SELECTED)}")
    return HIGHER_IS_SELECTED[scorer]
