"""The paper's chain before NeFT training: reference full fine-tune → cosine scores → selection.

The reference weights and the scores are cached under `<cache_dir>/neft/<key>/`, keyed by the
reference run's own resolved config minus what cannot change its weights (`NOT_WEIGHTS`: logging,
evaluation, paths; the key is written to key.json), and built under a file lock: a
sweep over budgets or selection methods computes them once, and concurrent jobs wait for the
first instead of duplicating or corrupting the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.io import apply_umask, atomic_write_json
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet, neuron_set_file
from neft_lab.neurons.scoring import WeightSource, cosine_scores
from neft_lab.neurons.selection import Budget, check_pooling, select

logger = logging.getLogger(__name__)

SCORED_METHODS = ("cosine", "reverse", "cosine_plus_reverse")
ALL_METHODS = (*SCORED_METHODS, "random", "from_file", "union")


# What cannot change the reference weights: logging, evaluation, checkpoints, output paths, the run's
# own method, and the devices it happens to run on. Everything else in the reference run's resolved
# config is part of the key, so a setting added later is keyed by default.
# fmt: off
NOT_WEIGHTS = (
    "stage", "ckpt", "resume", "threads", "experiment_name", "report", "eval", "export", "logger",
    "callbacks", "paths", "strategy", "selection", "budget", "hydra",
    "model.cache_dir",
    "optim.clip_scope",  # NeFT's clipping norm; the reference is a full fine-tune, where every gradient is selected
    "task.stop", "task.metrics", "task.max_new_tokens", "task.bleu_lowercase",
    "task.data.test_dir", "task.data.test_split", "task.data.max_test",
    "loader.eval_batch_size", "loader.num_workers",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.val_check_interval", "trainer.check_val_every_n_epoch", "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps", "trainer.enable_checkpointing", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.default_root_dir",
)
# fmt: on


def reference_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config of the reference run: a full fine-tune of selection.reference.steps steps."""
    ref = cfg.selection.reference
    derived = OmegaConf.to_container(cfg, resolve=True)
    derived.update(
        strategy={"name": "full"},
        selection={"name": "none"},
        callbacks={},
        logger={},
        eval={**derived["eval"], "before": False, "after": False},
        export={"enabled": True},
    )
    derived["optim"]["lr"] = float(ref.lr)
    derived["loader"]["batch_size"] = int(ref.batch_size)
    derived["trainer"].update(
        max_steps=int(ref.steps),
        limit_val_batches=0,
        enable_checkpointing=False,
        val_check_interval=int(ref.steps),
    )
    return derived


def reference_key(cfg: DictConfig) -> dict[str, Any]:
    """Everything that changes the reference weights (hence the scores), plus the kinds that are scored."""
    key = reference_config(cfg)
    for dotted in NOT_WEIGHTS:
        *parents, leaf = dotted.split(".")
        node = key
        for part in parents:
            node = node.get(part) or {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    key["kinds"] = sorted(cfg.selection.modules)
    return key


def cache_folder(cfg: DictConfig) -> Path:
    key = reference_key(cfg)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = f"{cfg.model.name}-{cfg.task.name}-K{key['trainer']['max_steps']}-s{key['seed']}-{digest}"
    return Path(cfg.paths.cache_dir) / "neft" / name.replace("/", "_")


def ensure_scores(cfg: DictConfig) -> Path:
    """Path of the cached scores for this config, running the reference fine-tune and scoring if needed."""
    folder = cache_folder(cfg)
    scores_file = folder / "scores.safetensors"
    if scores_file.exists():
        logger.info("neuron scores from cache: %s", scores_file)
        return scores_file
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if scores_file.exists():  # another job finished it while we waited
            return scores_file
        reference = _reference_model(cfg, folder)
        started = time.perf_counter()
        base = base_weights(cfg)
        space = NeuronSpace.from_shapes(base.model_type, base.shapes(), cfg.selection.modules)
        scores = cosine_scores(base, WeightSource(reference), space)
        tmp = folder / ".scores.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp))
        apply_umask(tmp)  # safetensors writes 0600; the cache is shared
        tmp.replace(scores_file)
        atomic_write_json(
            folder / "key.json", {**reference_key(cfg), "scoring_seconds": time.perf_counter() - started}
        )
        if not cfg.selection.reference.keep:
            shutil.rmtree(reference.parent, ignore_errors=True)
    return scores_file


_BASE_CACHE: dict[str, WeightSource] = {}


def base_weights(cfg: DictConfig) -> WeightSource:
    """The base weights: the model's folder on disk, or (tiny models) the model built in memory."""
    from neft_lab.models.loading import load_model, model_folder

    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True, default=str)
    if key not in _BASE_CACHE:
        folder = model_folder(cfg.model)
        if folder is None:
            _BASE_CACHE[key] = WeightSource(load_model(cfg.model)[0])
        else:
            if not Path(folder).is_dir():  # a hub id: its local snapshot (downloaded when online)
                from huggingface_hub import snapshot_download

                folder = snapshot_download(folder, allow_patterns=["*.json", "*.safetensors"])
            _BASE_CACHE[key] = WeightSource(folder)
    return _BASE_CACHE[key]


def _reference_model(cfg: DictConfig, folder: Path) -> Path:
    """Fine-tune the whole model for selection.reference.steps steps; returns its exported folder."""
    export = folder / "reference" / "export"
    if (export / "config.json").exists():
        return export
    from neft_lab.pipeline import run

    ref = cfg.selection.reference
    logger.info(
        "reference run: full fine-tuning for %d steps (lr %g) to score neurons → %s",
        ref.steps,
        ref.lr,
        folder,
    )
    derived = reference_config(cfg)
    # One process, whatever the run uses: under trainer=ddp/fsdp whichever rank takes the cache lock
    # runs this (before any process group exists) and must not launch ranks of its own — on its own
    # GPU, not on GPU 0, where another rank will train.
    import os

    gpu = derived["trainer"].get("accelerator") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    derived["trainer"].update(
        devices=[local_rank % torch.cuda.device_count()] if gpu else 1,
        num_nodes=1,
        strategy="auto",
    )
    derived["paths"]["run_dir"] = str(folder / "reference")
    # "reference step k/K" (a bar over max_steps), not Lightning's default bar, which reads "Epoch 0/-2"
    bar = {"_target_": "neft_lab.pipeline.StepProgressBar", "label": "reference step"}
    derived["callbacks"] = (
        {"progress_bar": bar} if derived["trainer"].get("enable_progress_bar", True) else {}
    )
    run(OmegaConf.create(derived))
    return export


def build_neuron_set(cfg: DictConfig, model: nn.Module, total_parameters: int) -> NeuronSet:
    """The neuron set the config asks for, checked against `model`."""
    sel = cfg.selection
    method = selection_method(sel)
    if method in ("from_file", "union"):
        files = selection_files(sel, method)
        sets = [NeuronSet.load(f) for f in files]
        for neuron_set in sets:
            neuron_set.check_same_space(NeuronSpace.from_model(model, neuron_set.space.kinds))
        result = sets[0]
        for other in sets[1:]:
            result = result.union(other)
        result.meta.update(method=method, files=[str(f) for f in files])
        return result
    space = NeuronSpace.from_model(model, sel.modules)
    budget = Budget(sel.budget.kind, float(sel.budget.value)).parameters(space, total_parameters, model)
    reverse = round(float(sel.reverse_share) * total_parameters) if method == "cosine_plus_reverse" else 0
    if method == "random":
        scores = {g.name: torch.zeros(g.count) for g in space.groups}
    else:
        scores = load_file(str(ensure_scores(cfg)))
    meta = {
        "model": {"name": cfg.model.name, "name_or_path": cfg.model.get("name_or_path")},
        "task": cfg.task.name,
        "budget": {"kind": sel.budget.kind, "value": float(sel.budget.value)},
        "reference_steps": int(sel.reference.steps) if method != "random" else None,
        "total_parameters": total_parameters,
    }
    neuron_set = select(scores, space, budget, method, sel.pooling, int(sel.seed), reverse, meta)
    if method == "random":
        neuron_set.scores = {}
    return neuron_set


def selection_method(sel: DictConfig) -> str:
    """`selection.method` (or the selection's name), checked against the known methods."""
    method = sel.get("method", sel.name)
    if method not in ALL_METHODS:
        raise ConfigError(
            f"selection.method={method!r}: unknown selection method, choose one of {ALL_METHODS}"
        )
    return method


def selection_files(sel: DictConfig, method: str) -> list[str]:
    """The neuron-set files of `selection=from_file` / `union`, each checked to exist."""
    files = [sel.get("file")] if method == "from_file" else list(sel.get("files") or [])
    if not all(files) or (method == "union" and len(files) < 2):
        raise ConfigError(
            f"selection={method} needs "
            + (
                "selection.file=<set>.safetensors"
                if method == "from_file"
                else "selection.files=[a.safetensors,b.safetensors]"
            )
        )
    for file in files:
        neuron_set_file(file)
    return [str(f) for f in files]


def check_selection(cfg: DictConfig) -> None:
    """What a NeFT selection can be checked for before any model is loaded or reference run starts:
    the method, the files it reads, the budget's kind and range, the pooling, the reference run's settings."""
    from neft_lab.validation import number, require_int, require_number, value_of

    sel = cfg.selection
    method = selection_method(sel)
    if method in ("from_file", "union"):
        for file in selection_files(sel, method):
            NeuronSet.load(file)  # a truncated or damaged file stops here, before any model is loaded
        return
    check_pooling(value_of(cfg, "selection.pooling"))
    kind = value_of(cfg, "selection.budget.kind")
    raw = OmegaConf.to_container(sel.budget, resolve=False).get("value")
    key = "budget" if kind == "share" and "${budget}" in str(raw) else "selection.budget.value"
    value = number(value_of(cfg, "selection.budget.value"), key, "a number", lambda v: True)
    Budget(str(kind), value).check(key)
    if method == "cosine_plus_reverse":
        require_number(cfg, "selection.reverse_share", ">= 0 and <= 1", lambda v: 0 <= v <= 1)
    if method in SCORED_METHODS:  # the reference fine-tune
        require_int(cfg, "selection.reference.steps", 1)
        require_number(cfg, "selection.reference.lr", "> 0", lambda v: v > 0)
        require_int(cfg, "selection.reference.batch_size", 1)
