"""What the selection chain (reference → scores → neuron set) is, as data: keys, cache folders, checks.

Nothing here trains or loads a model to train: the stages that run the reference fine-tune and the
scorers live in `neft_lab.chain` (the pipeline's layer), which composes them. This module says
*which* reference run and which scores a config asks for (`reference_config`, `scores_key`), where they
are cached (`cache_folder`, `scores_folder`: keyed by everything that can change them, written to the
scores file's metadata) and how a set is chosen from a scores file (`build_neuron_set`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.neurons import scores_file as scores_io
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet, neuron_set_file
from neft_lab.neurons.scorers import HIGHER_IS_SELECTED
from neft_lab.neurons.scoring import WeightSource, separation_problem
from neft_lab.neurons.selection import Budget, budget_share, check_pooling, select

logger = logging.getLogger(__name__)

SCORED_METHODS = ("cosine", "reverse", "cosine_plus_reverse")  # "cosine": the scorer's most affected first
ALL_METHODS = (*SCORED_METHODS, "random", "from_file", "union")
# cosine (the paper) | lora_reference | gradient | probe (the paper's §3.1 probe) | activation_ridge
SCORERS = tuple(HIGHER_IS_SELECTED)
REFERENCE_SCORERS = ("cosine", "lora_reference")  # scorers that need a reference fine-tune
DATA_SCORERS = ("gradient",)  # scorers that read the task's training data themselves


# What cannot change the reference weights: logging, evaluation, checkpoints, output paths, the run's
# own method, and the devices it happens to run on. Everything else in the reference run's resolved
# config is part of the key, so a setting added later is keyed by default.
# fmt: off
NOT_WEIGHTS = (
    "stage", "ckpt", "resume", "threads", "experiment_name", "report", "eval", "export", "logger",
    "callbacks", "paths", "strategy", "selection", "budget", "hydra",
    "model.cache_dir", "model.quantization",  # the reference is a full fine-tune, never on a 4-bit base
    "optim.clip_scope",  # NeFT's clipping norm; the reference is a full fine-tune, where every gradient is selected
    "task.stop", "task.metrics", "task.max_new_tokens", "task.bleu_lowercase",
    "task.max_new_tokens_ratio", "task.no_repeat_ngram_size", "task.newlines",  # decoding only
    "task.data.test_dir", "task.data.test_split", "task.data.max_test",
    "loader.eval_batch_size", "loader.num_workers",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.val_check_interval", "trainer.check_val_every_n_epoch", "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps", "trainer.enable_checkpointing", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.default_root_dir",
    "optim.loss_average",  # how the batch's tokens are averaged over processes: keyed no more than trainer.devices
)
# fmt: on
# Settings added after references were cached: at the value that trains as before they stay out of the key, so a
# reference cached before they existed is still found; any other value is keyed.
KEYED_UNLESS = {"loader.group_by_length": False}


def scorer_of(cfg: DictConfig) -> str:
    """`selection.scorer` (cosine when absent), checked."""
    scorer = str(cfg.selection.get("scorer") or "cosine")
    if scorer not in SCORERS:
        raise ConfigError(f"selection.scorer={scorer!r}: unknown scorer, choose one of {SCORERS}")
    return scorer


def reference_strategy(cfg: DictConfig) -> dict[str, Any]:
    """The reference run's strategy: full fine-tuning (the paper), or LoRA on all linear layers (lora_reference)."""
    if scorer_of(cfg) != "lora_reference":
        return {"name": "full"}
    lora = cfg.selection.lora_reference
    return {
        "name": "lora",
        "r": int(lora.r),
        "alpha": int(lora.alpha),
        "dropout": 0.0,
        "target_modules": "all-linear",
        "bias": "none",
        "merge_on_export": False,
    }


def reference_horizon(cfg: DictConfig) -> tuple[int, str] | None:
    """`selection.reference.horizon`: the length of the reference run's learning-rate schedule, (n, "steps")
    or (n, "epochs"); None (the default) = K, a run whose schedule ends at its last step (ours)."""
    from neft_lab.training.module import parse_horizon

    ref = cfg.selection.get("reference")
    value = ref.get("horizon") if ref is not None else None
    return parse_horizon(value, "selection.reference.horizon")


def _horizon_label(horizon: tuple[int, str]) -> str:
    count, unit = horizon
    return f"{count}ep" if unit == "epochs" else str(count)


def reference_snapshots(cfg: DictConfig) -> list[int]:
    """`selection.reference.snapshots`: the steps, besides K, at which a reference run with a horizon keeps a
    resumable checkpoint (the presets: 800, the paper's "Early" reference of the same run)."""
    values = cfg.selection.reference.get("snapshots") or []
    steps = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"selection.reference.snapshots={list(values)}: give optimizer steps >= 1, e.g. [800]"
            )
        steps.append(int(value))
    return sorted(set(steps))


def reference_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config of the reference run: a full (or, for lora_reference, a LoRA) fine-tune stopped
    at K = selection.reference.steps steps, whose schedule ends at K or, with selection.reference.horizon,
    runs on past it (K is then a checkpoint on the way, as the authors' checkpoint-3200)."""
    ref = cfg.selection.reference
    derived = OmegaConf.to_container(cfg, resolve=True)
    derived.update(
        stage="fit",
        strategy=reference_strategy(cfg),
        selection={"name": "none"},
        callbacks={},
        logger={},
        eval={**derived["eval"], "before": False, "after": False},
        export={"enabled": True},
    )
    derived["optim"]["lr"] = float(
        cfg.selection.lora_reference.lr if scorer_of(cfg) == "lora_reference" else ref.lr
    )
    derived["loader"]["batch_size"] = int(ref.batch_size)
    derived["model"]["quantization"] = None  # a full fine-tune trains every weight: never on a 4-bit base
    derived["trainer"].update(
        max_steps=int(ref.steps),
        max_epochs=-1,  # K steps, whatever the run's own epochs
        limit_val_batches=0,
        enable_checkpointing=False,
        val_check_interval=int(ref.steps),
    )
    horizon = reference_horizon(cfg)
    if horizon is not None:  # only then: the key of a horizon=null reference is what it always was
        derived["optim"]["horizon"] = _horizon_label(horizon)
    return derived


def _without(config: dict[str, Any], dotted_keys: tuple[str, ...]) -> dict[str, Any]:
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part) or {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def _weights_key(config: dict[str, Any]) -> dict[str, Any]:
    """`config` less NOT_WEIGHTS, and less each KEYED_UNLESS setting that has the value it had before it existed."""
    at_old_value = tuple(
        k for k, old in KEYED_UNLESS.items() if OmegaConf.select(OmegaConf.create(config), k) == old
    )
    return _without(config, (*NOT_WEIGHTS, *at_old_value))


def reference_key(cfg: DictConfig) -> dict[str, Any]:
    """Everything that changes the reference weights (hence the scores): the reference run's config minus
    NOT_WEIGHTS, the fingerprints of the base weights and of the training data, and the kinds scored.
    With `selection.reference.run`, that finished run's own config and the checkpoint it exported."""
    given = reference_run(cfg)
    if given is not None:
        run_cfg, metrics = finished_reference_run(cfg, given)
        key = _weights_key(OmegaConf.to_container(run_cfg, resolve=True))
        key["reference_checkpoint"] = Path(str((metrics.get("train") or {}).get("best_checkpoint"))).name
        data = data_fingerprint(run_cfg)
    else:
        key = _weights_key(reference_config(cfg))
        data = data_fingerprint(cfg)
    if scorer_of(cfg) == "lora_reference":
        key["reference_strategy"] = reference_strategy(cfg)
    key["kinds"] = sorted(cfg.selection.modules)
    key["fingerprints"] = {"model": model_fingerprint(cfg.model), "data": data}
    return key


def reference_run(cfg: DictConfig) -> Path | None:
    """`selection.reference.run`: a finished full fine-tune that serves as the reference (None: run one)."""
    reference = cfg.selection.get("reference")
    value = reference.get("run") if reference is not None else None
    return Path(str(value)).expanduser() if value else None


def finished_reference_run(cfg: DictConfig, folder: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The config and metrics of `selection.reference.run`, checked: a finished full fine-tune of this
    run's base model whose export is there."""
    from neft_lab.run_folder import finished_metrics

    where = f"selection.reference.run={folder}"
    if scorer_of(cfg) != "cosine":
        raise ConfigError(
            f"{where}: a finished full fine-tune is a reference for selection.scorer=cosine only"
        )
    if not (folder / "config.yaml").is_file():
        raise ConfigError(
            f"{where}: not a run folder (no config.yaml): give the folder of a finished strategy=full run"
        )
    metrics = finished_metrics(folder)
    if not metrics or "train" not in metrics:
        raise ConfigError(
            f"{where}: the run has not finished (no complete metrics.json): finish or resume it first"
        )
    run_cfg = OmegaConf.load(folder / "config.yaml")
    strategy = OmegaConf.select(run_cfg, "strategy.name")
    if strategy != "full":
        raise ConfigError(
            f"{where}: a strategy={strategy} run; the reference must be full fine-tuning (strategy=full)"
        )
    if not (folder / "export" / "config.json").is_file():
        raise ConfigError(
            f"{where}: no exported model in {folder / 'export'} (was it run with export.enabled=false?)"
        )
    if model_fingerprint(run_cfg.model) != model_fingerprint(cfg.model):
        raise ConfigError(
            f"{where}: that run fine-tuned model {run_cfg.model.name}, this run uses {cfg.model.name}: "
            "a reference must start from the same base weights"
        )
    return run_cfg, metrics


def scores_key(cfg: DictConfig) -> dict[str, Any]:
    """Everything the scores of this config depend on; a scores file records it and is refused for another."""
    scorer = scorer_of(cfg)
    if scorer in REFERENCE_SCORERS:
        return {"scorer": scorer, **reference_key(cfg)}
    sel = cfg.selection
    resolved = OmegaConf.to_container(cfg, resolve=True)
    key: dict[str, Any] = {
        "scorer": scorer,
        "model": _without(resolved["model"], ("cache_dir",)),
        "kinds": sorted(sel.modules),
        "fingerprints": {"model": model_fingerprint(cfg.model)},
    }
    if scorer == "gradient":
        task = _without(
            resolved["task"], tuple(k.removeprefix("task.") for k in NOT_WEIGHTS if k.startswith("task."))
        )
        key.update(
            task=task,
            seed=int(cfg.seed),
            batch_size=int(sel.gradient.batch_size),
            batches=int(sel.gradient.batches),
            per_example=bool(sel.gradient.per_example),
        )
        key["fingerprints"]["data"] = data_fingerprint(cfg)
    else:  # probe (the paper's) | activation_ridge: the scorer's settings block and the data it reads
        block = OmegaConf.to_container(sel[scorer], resolve=True)
        key[scorer] = block
        key["fingerprints"]["data"] = (
            file_fingerprint(Path(block["file"])) if block.get("file") else data_fingerprint(cfg)
        )
    return key


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_folder(cfg: DictConfig) -> Path:
    """The reference run's cache folder (also home of its scores). Keyed by K when the schedule ends at K;
    with selection.reference.horizon by the horizon and not K: one run, its checkpoints at every K
    (`reference_export`), each K's scores in a subfolder (`scores_folder`)."""
    key = reference_key(cfg)
    kind = "" if scorer_of(cfg) == "cosine" else "lora-"
    horizon = reference_horizon(cfg) if reference_run(cfg) is None else None
    if horizon is None:
        length = f"K{key['trainer']['max_steps']}"
    else:
        key["trainer"].pop("max_steps")
        key["trainer"].pop("val_check_interval", None)
        length = f"H{_horizon_label(horizon)}"
    name = f"{kind}{cfg.model.name}-{cfg.task.name}-{length}-s{key['seed']}-{_digest(key)}"
    return Path(cfg.paths.cache_dir) / "neft" / name.replace("/", "_")


def reference_step_folder(cfg: DictConfig) -> Path:
    """Under a horizon's cache folder, the folder of step K: its reference run (`reference/`) and its scores."""
    return cache_folder(cfg) / f"K{int(cfg.selection.reference.steps):06d}"


def reference_keep(cfg: DictConfig) -> str:
    """`selection.reference.keep`: what of the cached reference run stays once its scores are written. scored
    (the default): only the weight matrices the scores were made from (`reference_weights`); full: the whole
    exported model (`stage=analyze` of the reference); none: nothing (the scores stay)."""
    from neft_lab.neurons.reference_weights import keep_setting

    reference = cfg.selection.get("reference")
    return keep_setting(reference.get("keep", "scored") if reference is not None else "scored")


def reference_export(cfg: DictConfig) -> Path:
    """Where the reference run of this config exports its model (not for selection.reference.run)."""
    if reference_horizon(cfg) is None:
        return cache_folder(cfg) / "reference" / "export"
    return reference_step_folder(cfg) / "reference" / "export"


def scores_folder(cfg: DictConfig) -> Path:
    """Where this config's scores are cached: beside their reference run, or under `scores/` (other scorers)."""
    scorer = scorer_of(cfg)
    if scorer in REFERENCE_SCORERS:
        if reference_run(cfg) is None and reference_horizon(cfg) is not None:
            return reference_step_folder(cfg)
        return cache_folder(cfg)
    name = f"{scorer}-{cfg.model.name}-{cfg.task.name}-{_digest(scores_key(cfg))}"
    return Path(cfg.paths.cache_dir) / "scores" / name.replace("/", "_")


def model_fingerprint(model_cfg: Any) -> str:
    """The base weights' identity: for a folder, its config and each weight file's size, head and tail; for a
    tiny model, its config (the weights are a function of it)."""
    from neft_lab.models.loading import model_folder

    folder = model_folder(model_cfg)
    if folder is None or not Path(folder).is_dir():  # tiny: built from its config; hub id: name + revision
        raw = (
            OmegaConf.to_container(model_cfg, resolve=True)
            if isinstance(model_cfg, DictConfig)
            else model_cfg
        )
        return _digest(_without(dict(raw), ("cache_dir",)))
    return _folder_fingerprint(str(Path(folder).resolve()))


@lru_cache(maxsize=16)
def _folder_fingerprint(folder: str) -> str:
    files = sorted(p for p in Path(folder).iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    return _digest({p.name: file_fingerprint(p) for p in files})


def file_fingerprint(path: Path, edge: int = 1 << 20) -> str:
    """Size plus the first and last MiB: any re-save or edit of a weight or data file changes it, read in ms."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(edge))
        if size > 2 * edge:
            handle.seek(-edge, 2)
            digest.update(handle.read(edge))
    return digest.hexdigest()[:16]


def data_fingerprint(cfg: DictConfig) -> str:
    """The training examples' content (sources and targets, in order): a changed data file is a new key."""
    task = json.dumps(OmegaConf.to_container(cfg.task, resolve=True), sort_keys=True, default=str)
    return _data_fingerprint(task, int(cfg.seed))


@lru_cache(maxsize=16)
def _data_fingerprint(task_json: str, seed: int) -> str:
    from neft_lab.data.task import Task

    train = Task.from_config(json.loads(task_json)).load_splits(seed)["train"]
    digest = hashlib.sha1()
    for example in train:
        digest.update(example.source.encode() + b"\x1f" + example.target.encode() + b"\x1e")
    return digest.hexdigest()[:16]


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


def build_neuron_set(
    cfg: DictConfig, model: nn.Module, total_parameters: int, scores_path: str | Path | None = None
) -> NeuronSet:
    """The neuron set the config asks for, checked against `model`; scored methods read `scores_path` (a
    scores file from `neft_lab.chain`, checked to be this config's)."""
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
    reverse = reverse_parameters(sel, total_parameters) if method == "cosine_plus_reverse" else 0
    scorer, ranked = None, None
    if method == "random":
        scores = {g.name: torch.zeros(g.count) for g in space.groups}
    else:
        if scores_path is None:
            raise ConfigError(
                f"selection.method={method} needs neuron scores: run it through `python -m neft_lab` (which runs "
                "the reference and scoring stages first) or give selection.scores=<scores.safetensors>"
            )
        scores, info = scores_io.load(scores_path, expected=scores_key(cfg), space=space)
        scorer = info["scorer"]
        if (problem := separation_problem(scores, scorer)) is not None:
            logger.warning("%s", problem)
        # select() takes the lowest first (the paper's cosine); a scorer whose highest are its most important
        # is ranked by the negated scores, so method=cosine/reverse mean "most/least affected first" for every scorer
        ranked = {k: -v for k, v in scores.items()} if HIGHER_IS_SELECTED[scorer] else scores
    meta = {
        "model": {"name": cfg.model.name, "name_or_path": cfg.model.get("name_or_path")},
        "task": cfg.task.name,
        "budget": {"kind": sel.budget.kind, "value": float(sel.budget.value)},
        "reference_steps": int(sel.reference.steps) if scorer in REFERENCE_SCORERS else None,
        "reference_horizon": (
            _horizon_label(h) if scorer in REFERENCE_SCORERS and (h := reference_horizon(cfg)) else None
        ),
        "scorer": scorer,
        "scores_file": None if scores_path is None else str(scores_path),
        "total_parameters": total_parameters,
    }
    neuron_set = select(ranked or scores, space, budget, method, sel.pooling, int(sel.seed), reverse, meta)
    neuron_set.scores = {} if method == "random" else dict(scores)  # as the scorer gave them
    return neuron_set


def reverse_parameters(sel: DictConfig, total_parameters: int) -> int:
    """cosine_plus_reverse: the parameters taken from the highest similarities, `selection.reverse_share` being a
    share of all parameters (0.03) or a paper point (paper_4: the authors' "Reversed4%", 75,000 vectors)."""
    return round(budget_share(sel.reverse_share) * total_parameters)


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


def check_budget_fits(cfg: DictConfig, budget: Budget) -> None:
    """A budget above what the model's selectable vectors hold is refused from the model's shapes (a meta
    skeleton: no weights), before a reference run is spent on it. Skipped when the model's config is not on
    this machine (a hub id not yet downloaded): the check then runs once the model is loaded."""
    from neft_lab.models.loading import parameter_count

    skeleton = _skeleton(cfg)
    if skeleton is None:
        return
    space = NeuronSpace.from_model(skeleton, cfg.selection.modules)
    budget.parameters(space, parameter_count(skeleton), skeleton)


def _skeleton(cfg: DictConfig) -> nn.Module | None:
    """The model's modules and shapes (no weights) when its config is on this machine, else None."""
    from neft_lab.models.loading import local_model_config_available, model_skeleton

    if not local_model_config_available(cfg.model):
        return None
    try:
        return model_skeleton(cfg.model)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - an unreadable config is reported when the model loads, with its own fix
        return None


def check_selection(cfg: DictConfig) -> None:
    """What a NeFT selection can be checked for before any model is loaded or reference run starts:
    the method, the files it reads, the budget's kind and range, the pooling, the reference run's settings."""
    from neft_lab.config_checks import number, require_int, require_number, value_of

    sel = cfg.selection
    method = selection_method(sel)
    if method in ("from_file", "union"):
        for file in selection_files(sel, method):
            NeuronSet.load(file)  # a truncated or damaged file stops here, before any model is loaded
        return
    check_pooling(value_of(cfg, "selection.pooling"))
    if "seed" in sel:
        require_int(cfg, "selection.seed", 0)
    kind = value_of(cfg, "selection.budget.kind")
    raw = OmegaConf.to_container(sel.budget, resolve=False).get("value")
    key = "budget" if kind == "share" and "${budget}" in str(raw) else "selection.budget.value"
    value = number(value_of(cfg, "selection.budget.value"), key, "a number", lambda v: True)
    Budget(str(kind), value).check(key)
    check_budget_fits(cfg, Budget(str(kind), value))
    if method == "cosine_plus_reverse":
        reverse = value_of(cfg, "selection.reverse_share")
        if isinstance(reverse, str) and reverse.startswith("paper_"):
            budget_share(reverse)  # a known paper point, else refused with the list of them
        else:
            require_number(cfg, "selection.reverse_share", ">= 0 and <= 1", lambda v: 0 <= v <= 1)
    if method not in SCORED_METHODS:
        return
    scorer = scorer_of(cfg)
    given = value_of(cfg, "selection.scores") if "scores" in sel else None
    if given:  # a scores file from stage=score: it must exist and be one (its key is checked when it is read)
        if not Path(str(given)).expanduser().is_file():
            raise ConfigError(f"selection.scores={given}: no such file (make one with stage=score)")
        skeleton = _skeleton(cfg)
        if skeleton is not None:  # intact, finite and one score per vector of this model: before any work
            space = NeuronSpace.from_model(skeleton, cfg.selection.modules)
            scores_io.load(Path(str(given)).expanduser(), space=space)
        return
    if reference_run(cfg) is not None:  # a finished full fine-tune given as the reference
        finished_reference_run(cfg, reference_run(cfg))
    elif scorer in REFERENCE_SCORERS:  # the reference fine-tune
        steps = require_int(cfg, "selection.reference.steps", 1)
        horizon = reference_horizon(cfg)
        if horizon is not None and horizon[1] == "steps" and horizon[0] < steps:
            raise ConfigError(
                f"selection.reference.horizon={horizon[0]} is shorter than selection.reference.steps={steps}: "
                "the reference is the checkpoint at step K of a schedule of `horizon` steps (K <= horizon)"
            )
        reference_snapshots(cfg)
        reference_keep(cfg)
        require_number(cfg, "selection.reference.lr", "> 0", lambda v: v > 0)
        require_int(cfg, "selection.reference.batch_size", 1)
    if scorer == "lora_reference":
        require_int(cfg, "selection.lora_reference.r", 1)
        require_number(cfg, "selection.lora_reference.lr", "> 0", lambda v: v > 0)
    elif scorer == "gradient":
        require_int(cfg, "selection.gradient.batches", 1)
        require_int(cfg, "selection.gradient.batch_size", 1)
    elif scorer == "probe":
        from neft_lab.neurons.scorers.probe import check_settings

        check_settings(lambda name: value_of(cfg, f"selection.probe.{name}"))
    elif scorer == "activation_ridge":
        probe_file = value_of(cfg, "selection.activation_ridge.file")
        if probe_file and not Path(str(probe_file)).expanduser().is_file():
            raise ConfigError(
                f"selection.activation_ridge.file={probe_file}: no such file (a JSON-lines file of "
                '{"text": ..., "label": ...}, or null to probe source-vs-target language on the task\'s training data)'
            )
        require_int(cfg, "selection.activation_ridge.max_examples", 2)


def check_chain_stage(cfg: DictConfig, stage: str) -> None:
    """stage=reference/score/select: a scored selection whose settings can run (the strategy is not used)."""
    from neft_lab.config_checks import (
        check_common,
        check_training,
        check_writable_folder,
        resolving,
        value_of,
    )
    from neft_lab.models.loading import check_model_config

    check_common(cfg)
    check_training(cfg)

    with resolving("model"):
        check_model_config(cfg.model)
    if value_of(cfg, "selection.name") in (None, "none"):
        raise ConfigError(
            f"stage={stage} needs a scored selection: add selection=cosine (the paper), selection=gradient, "
            "selection=lora_reference, selection=probe or selection=activation_probe"
        )
    method = selection_method(cfg.selection)
    if method not in SCORED_METHODS:
        raise ConfigError(
            f"stage={stage} runs the scoring chain, but selection.method={method} needs no scores: "
            "train directly with stage=fit"
        )
    if stage == "reference" and scorer_of(cfg) not in REFERENCE_SCORERS:
        raise ConfigError(
            f"stage=reference: selection.scorer={scorer_of(cfg)} needs no reference run; go on with stage=score"
        )
    check_selection(cfg)
    check_writable_folder(cfg, "paths.cache_dir")
