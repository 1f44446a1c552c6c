"""NeFT's selection chain: reference → score → select. The stages of those names (`neft_lab.stages.reference`,
`.score`, `.select`) run one link each; a NeFT fit runs the chain it needs (`scores_for_fit`).

    python -m neft_lab stage=reference selection=cosine ...     # the short full fine-tune (cached)
    python -m neft_lab stage=score     selection=cosine ...     # scores of every neuron vector (cached)
    python -m neft_lab stage=select    selection=cosine selection.scores=<scores.safetensors> budget=0.09
    python -m neft_lab strategy=neft   selection=from_file selection.file=<neuron set>    # fit on that set

`strategy=neft` without a set runs the same stages in one command (`scores_for_fit`). Strategies and
`neft_lab.neurons` never start a run: the reference fine-tune is started here, through `pipeline.run`,
and the scorers (`neurons/scorers/`) only read models and data. Every output is keyed by what it was
made from (`workflow.scores_key`: model and data fingerprints, reference and scorer settings), so a
changed input makes a new one and a stale file given by hand is refused.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from neft_lab import selection_workflow as workflow
from neft_lab.config import command_line_overrides, override_of
from neft_lab.errors import ConfigError
from neft_lab.neurons import reference_weights
from neft_lab.neurons import scores_file as scores_io
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet

logger = logging.getLogger(__name__)


def next_command(args: list[str], replaced: tuple[str, ...]) -> str:
    """The command of the next stage, to copy as printed: `args` plus every override the user gave this one
    (model, task, trainer, paths, ...) except those `args` replace (`replaced`: keys, each with its subkeys)."""
    kept = [o for o in command_line_overrides() if not override_of(o, replaced)]
    return " ".join(["python -m neft_lab", *(shlex.quote(a) for a in [*args, *kept])])


# ---- reference ------------------------------------------------------------------------------------------
def reference(cfg: DictConfig) -> Path:
    """The reference fine-tune's exported model (full: a HF folder; lora_reference: a PEFT adapter), cached;
    or the export of the finished full fine-tune given as `selection.reference.run`."""
    given = workflow.reference_run(cfg)
    if given is not None:
        workflow.finished_reference_run(cfg, given)
        logger.info("reference model: the finished full fine-tune %s", given)
        return given / "export"
    folder = workflow.cache_folder(cfg)
    export = workflow.reference_export(cfg)
    if _exported(export, cfg, say=True):
        held = reference_weights.compact_metadata(export) if reference_weights.is_compact(export) else None
        what = f" (compact: the {'/'.join(held['kinds'])} matrices the scores were made from)" if held else ""
        logger.info("reference model from cache: %s%s", export, what)
        return export
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if not _exported(export, cfg):  # another job may have finished it while we waited
            # a compact export that cannot serve this config: its run is made again
            if reference_weights.is_compact(export):
                shutil.rmtree(export.parent)
            _run_reference(cfg, folder)
    return export


def _exported(export: Path, cfg: DictConfig, say: bool = False) -> bool:
    """Whether `export` serves this config: a whole model (full; lora_reference: its adapter), or the compact
    form (`reference_weights`) when it holds every matrix the config scores and the config does not ask for
    the whole model (`selection.reference.keep=full`). `say`: log why a compact one cannot."""
    if (export / "config.json").exists() or (export / "adapter_config.json").exists():
        return True
    if not reference_weights.is_compact(export):
        return False
    held = reference_weights.compact_metadata(export)
    lacking = [k for k in cfg.selection.modules if held is not None and k not in held["kinds"]]
    if held is None:
        why = f"its {reference_weights.FILE} is damaged"
    elif lacking:
        why = f"it lacks the {'/'.join(lacking)} matrices this config scores (it holds {'/'.join(held['kinds'])})"
    elif workflow.reference_keep(cfg) == "full":
        why = (
            f"it keeps only the {'/'.join(held['kinds'])} matrices the scores were made from and "
            "selection.reference.keep=full asks for the whole model"
        )
    else:
        return True
    if say:
        logger.info("the cached reference %s cannot serve: %s; running the reference again", export, why)
    return False


def _run_reference(cfg: DictConfig, folder: Path) -> None:
    from neft_lab.pipeline import run

    derived = workflow.reference_config(cfg)
    horizon = derived["optim"].get("horizon")
    logger.info(
        "reference run: %s for %d steps (lr %g, schedule over %s) to score neurons → %s",
        "full fine-tuning" if derived["strategy"]["name"] == "full" else f"LoRA r={derived['strategy']['r']}",
        cfg.selection.reference.steps,
        derived["optim"]["lr"],
        f"{horizon} steps" if horizon and str(horizon).isdigit() else (horizon or "those steps"),
        folder,
    )
    # One process, whatever the run uses: under trainer=ddp/fsdp whichever rank takes the cache lock
    # runs this (before any process group exists) and must not launch ranks of its own — on its own
    # GPU, not on GPU 0, where another rank will train.
    gpu = derived["trainer"].get("accelerator") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    derived["trainer"].update(
        devices=[local_rank % torch.cuda.device_count()] if gpu else 1, num_nodes=1, strategy="auto"
    )
    derived["paths"]["run_dir"] = str(folder / "reference")
    # "reference step k/K" (a bar over max_steps), not Lightning's default bar, which reads "Epoch 0/-2"
    bar = {"_target_": "neft_lab.training.trainer.StepProgressBar", "label": "reference step"}
    derived["callbacks"] = (
        {"progress_bar": bar} if derived["trainer"].get("enable_progress_bar", True) else {}
    )
    if workflow.reference_horizon(cfg) is not None:
        _continue_from_snapshot(cfg, folder, derived)
    run(OmegaConf.create(derived))


def _continue_from_snapshot(cfg: DictConfig, folder: Path, derived: dict[str, Any]) -> None:
    """A reference with its own horizon is one run for every K: this K's run starts from the latest
    snapshot at or before K (or from scratch) and keeps resumable snapshots at K and at
    `selection.reference.snapshots` in <folder>/snapshots, so an earlier K is served from them and a later K
    continues from them (the same schedule, data order and optimizer state as one uninterrupted run)."""
    k = int(cfg.selection.reference.steps)
    run_dir = workflow.reference_step_folder(cfg) / "reference"
    snapshots = folder / "snapshots"
    derived["paths"]["run_dir"] = str(run_dir)
    derived["resume"] = "auto"  # continue from the snapshot (or an interrupted attempt at this K)
    derived["callbacks"]["reference_snapshots"] = {
        "_target_": "neft_lab.chain.ReferenceSnapshots",
        "dirpath": str(snapshots),
        "steps": sorted({k, *workflow.reference_snapshots(cfg)}),
    }
    last = run_dir / "checkpoints" / "last.ckpt"
    earlier = sorted(
        (step, path)
        for path in snapshots.glob("step*.ckpt")
        if (step := _snapshot_step(path)) is not None and step <= k
    )
    if earlier and not last.exists():
        step, path = earlier[-1]
        last.parent.mkdir(parents=True, exist_ok=True)
        try:  # checkpoints are written by rename (AtomicCheckpointIO): a hard link never sees a change
            os.link(path, last)
        except OSError:
            shutil.copyfile(path, last)
        logger.info("reference run: step %d from the snapshot %s, on to K=%d", step, path, k)


def _snapshot_step(path: Path) -> int | None:
    digits = path.stem.removeprefix("step")
    return int(digits) if digits.isdigit() else None


class ReferenceSnapshots(L.Callback):
    """Saves a resumable checkpoint (`trainer.save_checkpoint`: weights, optimizer, schedule, loop state) at the
    given optimizer steps as <dirpath>/step<NNNNNN>.ckpt, unless one is there."""

    def __init__(self, dirpath: str, steps: list[int]) -> None:
        self.dirpath = Path(dirpath)
        self.steps = {int(s) for s in steps}

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        step = trainer.global_step
        path = self.dirpath / f"step{step:06d}.ckpt"
        if step in self.steps and not path.exists():
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(path)
            logger.info("reference snapshot at step %d: %s", step, path)


# ---- score ----------------------------------------------------------------------------------------------
def scores(cfg: DictConfig) -> Path:
    """This config's scores file, computed (after its reference run, if the scorer has one) unless cached."""
    given = cfg.selection.get("scores")
    if given:  # a file from an earlier stage=score: checked against this config when read
        scores_io.load(Path(str(given)).expanduser(), expected=workflow.scores_key(cfg))
        return Path(str(given)).expanduser()
    folder = workflow.scores_folder(cfg)
    out = folder / "scores.safetensors"
    key = workflow.scores_key(cfg)
    if _fresh(out, key):
        given_run = workflow.reference_run(cfg)
        against = f" (scored against the finished full fine-tune {given_run})" if given_run else ""
        logger.info("neuron scores from cache: %s%s", out, against)
        if _whole_reference_wanted(cfg):  # keep=full on an entry kept compact: the reference runs again
            reference(cfg)
        return out
    reference_model = reference(cfg) if workflow.scorer_of(cfg) in workflow.REFERENCE_SCORERS else None
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if _fresh(out, key):
            logger.info("neuron scores from cache: %s (made by another job while this one waited)", out)
            return out
        started, rss_before = time.perf_counter(), _peak_rss_gib()
        computed = _compute(cfg, reference_model)
        info = {
            "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_gib": round(_peak_rss_gib(), 3),  # of this process so far (the reference run included)
            "peak_rss_gib_before": round(rss_before, 3),
            "vectors": sum(int(v.numel()) for v in computed.values()),
        }
        scores_io.save(out, computed, key, info)
        if reference_model is not None and workflow.reference_run(cfg) is None:
            _trim_reference(cfg, reference_model)
    return out


def _trim_reference(cfg: DictConfig, export: Path) -> None:
    """Once scored, the cached reference run keeps what `selection.reference.keep` says: scored (the default)
    the matrices the scores were made from, in compact form (`reference_weights`); full its whole export;
    none nothing. Its checkpoints (an interrupted run's) go in every case; a horizon's snapshots stay."""
    run_folder = export.parent
    keep = workflow.reference_keep(cfg)
    if keep == "none":
        shutil.rmtree(run_folder, ignore_errors=True)
        logger.info("reference run removed once scored (selection.reference.keep=none): %s", run_folder)
        return
    shutil.rmtree(run_folder / "checkpoints", ignore_errors=True)
    if keep == "full" or workflow.scorer_of(cfg) != "cosine" or not (export / "config.json").exists():
        return  # the whole model, a LoRA adapter (lora_reference: all of it is read), or already compact
    from neft_lab.cache import human

    info = reference_weights.compact(export, list(cfg.selection.modules))
    logger.info(
        "reference weights: kept the %s matrices the scores were made from (%s of the %s export) in %s; "
        "selection.reference.keep=full keeps the whole model",
        "/".join(info["kinds"]),
        human(info["bytes"]),
        human(info["export_bytes"]),
        export / reference_weights.FILE,
    )


def _whole_reference_wanted(cfg: DictConfig) -> bool:
    """`selection.reference.keep=full` where this config's cached reference was kept compact."""
    return (
        workflow.scorer_of(cfg) in workflow.REFERENCE_SCORERS
        and workflow.reference_run(cfg) is None
        and workflow.reference_keep(cfg) == "full"
        and reference_weights.is_compact(workflow.reference_export(cfg))
    )


def _fresh(path: Path, key: dict[str, Any]) -> bool:
    if not path.exists():
        return False
    try:
        scores_io.load(path, expected=key)
    except ConfigError as err:  # a cache entry of another version or damaged: make it again
        logger.warning("%s; scoring again", err)
        return False
    return True


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _compute(cfg: DictConfig, reference_model: Path | None) -> dict[str, torch.Tensor]:
    from neft_lab.models.loading import load_model

    scorer = workflow.scorer_of(cfg)
    kinds = list(cfg.selection.modules)
    if scorer == "cosine":
        from neft_lab.neurons.scoring import WeightSource, cosine_scores

        base = workflow.base_weights(cfg)
        space = NeuronSpace.from_shapes(base.model_type, base.shapes(), kinds)
        return cosine_scores(base, WeightSource(reference_model), space)
    model, tokenizer = load_model(cfg.model)
    space = NeuronSpace.from_model(model, kinds)
    if scorer == "lora_reference":
        from peft import PeftModel

        from neft_lab.neurons.scorers.lora_reference import lora_reference_scores

        tuned = PeftModel.from_pretrained(model, str(reference_model))
        return lora_reference_scores(tuned, tuned, space)
    if scorer == "gradient":
        from neft_lab.neurons.scorers.gradient import gradient_scores

        grad = cfg.selection.gradient
        batches = _train_batches(cfg, tokenizer, int(grad.batch_size))
        return gradient_scores(
            model, batches, space, max_batches=int(grad.batches), per_example=bool(grad.per_example)
        )
    if scorer == "activation_ridge":
        from neft_lab.neurons.scorers.activation_ridge import activation_ridge_scores

        texts, labels = probe_data(cfg)
        probe = cfg.selection.activation_ridge
        alpha = None if probe.get("alpha") is None else float(probe.alpha)
        return activation_ridge_scores(
            model, tokenizer, texts, labels, space, alpha=alpha, batch_size=int(probe.batch_size)
        )
    return _paper_probe_scores(cfg, model, tokenizer, space)


def _paper_probe_scores(
    cfg: DictConfig, model: Any, tokenizer: Any, space: NeuronSpace
) -> dict[str, torch.Tensor]:
    """scorer=probe: the paper's residual-stream probe on the user's labelled file (`selection.probe.*`)."""
    from neft_lab.data.classification import read_labelled_texts
    from neft_lab.neurons.scorers.probe import AUTHORS_ALPHAS, probe_scores

    probe = OmegaConf.to_container(cfg.selection.probe, resolve=True)
    data = read_labelled_texts(
        probe["file"],
        key="selection.probe.file",
        text_field=probe["text_field"],
        label_field=probe["label_field"],
        label_names=probe["label_names"],
        template=probe["template"],
        max_examples=probe["max_examples"],
    )
    return probe_scores(
        model,
        tokenizer,
        data.texts,
        data.labels,
        space,
        pooling=probe["pooling"],
        directions=probe["directions"],
        alphas=AUTHORS_ALPHAS if probe["alphas"] is None else [float(a) for a in probe["alphas"]],
        test_examples=int(probe["test_examples"]),
        split_seed=int(probe["split_seed"]),
        batch_size=int(probe["batch_size"]),
        max_length=int(probe["max_length"]),
    )


def _train_batches(cfg: DictConfig, tokenizer: Any, batch_size: int) -> Any:
    """The task's training batches in the training run's order (the same seeded shuffle)."""
    from neft_lab.data.datamodule import TaskDataModule
    from neft_lab.data.encoding import PromptEncoder
    from neft_lab.data.task import Task

    task = Task.from_config(cfg.task)
    encoder = PromptEncoder(tokenizer, task, chat_template=cfg.model.chat_template)
    datamodule = TaskDataModule(
        task,
        encoder,
        batch_size=batch_size,
        seed=int(cfg.seed),
        group_by_length=bool(cfg.loader.get("group_by_length")),
    )
    datamodule.setup()
    return datamodule.train_dataloader()


def probe_data(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """scorer=activation_ridge's labelled examples: `selection.activation_ridge.file` (JSON lines with "text" and
    an integer "label"), or, when none is given, language identification on the task's training pairs (sources
    label 0, targets 1)."""
    probe = cfg.selection.activation_ridge
    limit = int(probe.max_examples)
    if probe.get("file"):
        path = Path(str(probe.file)).expanduser()
        texts, labels = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                labels.append(int(row["label"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ConfigError(
                    f'{path}:{number}: each line must be a JSON object with "text" and an integer "label"'
                ) from None
        return texts[:limit], labels[:limit]
    from neft_lab.data.task import Task

    train = Task.from_config(cfg.task).load_splits(int(cfg.seed))["train"][: max(limit // 2, 1)]
    return [e.source for e in train] + [e.target for e in train], [0] * len(train) + [1] * len(train)


# ---- select ---------------------------------------------------------------------------------------------
def select_to_file(cfg: DictConfig) -> Path:
    """`stage=select`: the neuron set of this config's scores and budget, written to `selection.out`."""
    neuron_set = select_set(cfg, scores(cfg))
    out_setting = cfg.selection.get("out")
    if out_setting:  # a relative path is under outputs/ (git-ignored), not wherever the command was typed
        out = Path(str(cfg.paths.output_dir)) / Path(str(out_setting)).expanduser()
    else:
        out = _default_set_path(cfg, neuron_set)
    return neuron_set.save(out)


def select_set(cfg: DictConfig, scores_path: Path) -> NeuronSet:
    """The neuron set from a scores file, laid out on the model's skeleton (no weights are loaded)."""
    from neft_lab.models.loading import model_skeleton, parameter_count

    model = model_skeleton(cfg.model)
    return workflow.build_neuron_set(cfg, model, parameter_count(model), scores_path)


def _default_set_path(cfg: DictConfig, neuron_set: NeuronSet) -> Path:
    method = workflow.selection_method(cfg.selection)
    share = 100 * neuron_set.num_parameters / max(int(neuron_set.meta.get("total_parameters") or 1), 1)
    name = f"{cfg.model.name}-{cfg.task.name}-{workflow.scorer_of(cfg)}-{method}-{share:.1f}pct-s{cfg.seed}"
    return Path(str(cfg.paths.output_dir)) / "neuron_sets" / name.replace("/", "_")


# ---- the whole chain, for a NeFT fit ------------------------------------------------------------------
def scores_for_fit(cfg: DictConfig) -> Path | None:
    """The scores a NeFT run's selection needs (None if it needs none): reference and scoring stages, cached."""
    sel = cfg.get("selection")
    if sel is None or sel.get("name", "none") == "none":
        return None
    if workflow.selection_method(sel) not in workflow.SCORED_METHODS:
        return None
    return scores(cfg)
