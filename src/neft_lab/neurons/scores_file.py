"""A scores file: one score per neuron vector, and the key of everything the scores depend on.

`<name>.safetensors` holds a tensor per vector group ("up.3") and, in its header, the scorer, its
direction and the key (`selection_workflow.scores_key`: model and data fingerprints, reference settings,
scorer settings); `<name>.json` beside it repeats that with the scoring stage's time and memory. A file
given for another model, other data or other reference settings is refused with the first settings
that differ, instead of being used as if it were this config's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neft_lab.errors import ConfigError
from neft_lab.integrity import HASH_KEY, check_content_hash, content_hash
from neft_lab.io import apply_umask, atomic_write_json
from neft_lab.neurons.geometry import NeuronSpace

FORMAT = "neft_lab.scores/1"


def save(
    path: str | Path, scores: dict[str, torch.Tensor], key: dict[str, Any], info: dict[str, Any]
) -> Path:
    """Write atomically: the tensors with the key in the header, then the readable JSON beside them."""
    from neft_lab.neurons.scorers import HIGHER_IS_SELECTED

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scorer = key["scorer"]
    header = {
        "format": FORMAT,
        "scorer": scorer,
        "higher_is_selected": json.dumps(HIGHER_IS_SELECTED[scorer]),
        "key": json.dumps(key, sort_keys=True, default=str),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in scores.items()}
    header[HASH_KEY] = content_hash(tensors)  # a flipped bit is refused when the file is read
    save_file(tensors, str(tmp), metadata=header)
    apply_umask(tmp)  # safetensors writes 0600; the cache is shared
    tmp.replace(path)
    atomic_write_json(path.with_suffix(".json"), {"scorer": scorer, **info, "key": key})
    return path


def load(
    path: str | Path, expected: dict[str, Any] | None = None, space: NeuronSpace | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Scores and their header; with `expected` (this config's key), refuse a file made for other settings;
    with `space` (the model's vector groups), refuse scores that do not give one finite score per vector."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"scores file {path} does not exist: make it with `python -m neft_lab stage=score ...`"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            scores = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
    except Exception as err:  # truncated or not safetensors
        raise ConfigError(
            f"scores file {path} cannot be read ({type(err).__name__}): make it again with stage=score"
        ) from None
    if header.get("format") != FORMAT:
        raise ConfigError(
            f"{path} is not a neft_lab scores file (no '{FORMAT}' header): make it with stage=score"
        )
    check_content_hash(scores, header.get(HASH_KEY), path, "make it again with stage=score")
    if space is not None:
        check_fits(scores, space, path)
    key = json.loads(header["key"])
    if expected is not None:
        difference = first_differences(key, json.loads(json.dumps(expected, sort_keys=True, default=str)))
        if difference:
            raise ConfigError(
                f"scores file {path} was made for other settings than this run ({'; '.join(difference)}): it is "
                "stale for this config. Score again (stage=score with this config), or drop selection.scores to let "
                "the run compute (and cache) its own"
            )
    return scores, {"scorer": header["scorer"], "key": key}


def check_fits(scores: dict[str, torch.Tensor], space: NeuronSpace, path: str | Path) -> None:
    """One finite score per vector of every group of the model (NaN scores selected a group's first vectors;
    3 scores for a group of 128 misplaced indices and dropped another group)."""
    fix = "score again with stage=score for this model (or drop selection.scores)"
    for group in space.groups:
        values = scores.get(group.name)
        if values is None:
            raise ConfigError(
                f"scores file {path} has no scores for {group.name}; this model has {group.count} vectors there: {fix}"
            )
        if tuple(values.shape) != (group.count,):
            raise ConfigError(
                f"scores file {path}: {group.name} holds scores of shape {tuple(values.shape)}, but this model has "
                f"{group.count} vectors there: {fix}"
            )
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise ConfigError(
                f"scores file {path} holds non-finite scores ({bad} NaN/inf in {group.name}): {fix}"
            )


def first_differences(made: Any, wanted: Any, prefix: str = "", limit: int = 4) -> list[str]:
    """Dotted keys whose values differ between the file's key and this config's, as 'key: file X, run Y'."""
    if isinstance(made, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for name in sorted(set(made) | set(wanted)):
            out += first_differences(made.get(name), wanted.get(name), f"{prefix}{name}.", limit - len(out))
            if len(out) >= limit:
                break
        return out
    if made == wanted:
        return []
    return [f"{prefix.rstrip('.')}: file {_short(made)}, run {_short(wanted)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
