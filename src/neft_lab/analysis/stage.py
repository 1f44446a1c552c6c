"""`stage=analyze`: the paper's §6 on finished runs and neuron sets, in one command.

    python -m neft_lab stage=analyze 'analysis.runs=[<neft run>,<full run>,<random run>]'

Measures the utilization of the base model (or `analysis.base`, a run folder) and of every run on the
sentences of one split, compares each run with it (ΔRank, categories, buckets), compares the neuron sets
(the runs' own and `analysis.sets`), and writes tables, summaries and PNGs to the analysis folder
(`analysis.out`, default `<first run>/analysis`; layout in artifacts.py). A run compared with its own base
model also gets `<run>/analysis/summary.json`, which `stage=report` reads for its ΔRank columns.
Utilization tables are reused when the model, the data and the statistic's settings are unchanged, so a
second call with another threshold, ranking, buckets or more runs measures only what is new.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from neft_lab.analysis import artifacts, compare, overlap, plots
from neft_lab.analysis.inputs import SPLITS, TOKENS, pad_id, split_sequences
from neft_lab.analysis.runs import (
    Run,
    assign_labels,
    check_same_base,
    load_base_model,
    load_run_model,
    method_label,
    read_run,
    run_config,
    trained_mask,
)
from neft_lab.analysis.utilization import (
    AGGREGATIONS,
    LAYERS,
    RANKINGS,
    STATISTICS,
    Generation,
    UtilizationTable,
    check_choice,
)
from neft_lab.data.task import Task
from neft_lab.errors import ConfigError
from neft_lab.io import atomic_write_json
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet, neuron_set_file

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"  # <run>/analysis/summary.json: the run against its base model (read by stage=report)


@dataclass
class Settings:
    runs: list[Run]
    base: Run | None  # None: the runs' base model
    sets: dict[str, Path]  # label → neuron-set file (analysis.sets)
    split: str
    max_sentences: int | None  # None: the whole split
    tokens: str
    batch_size: int
    kinds: list[str]
    statistic: str
    layers: str
    aggregation: str
    ranking: str
    threshold: float
    buckets: list[float]
    bucket_scale: str
    max_new_tokens: int
    no_repeat_ngram_size: int
    out: Path
    device: str
    raw: dict[str, Any] = field(default_factory=dict)


def _list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [value]
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    raise ConfigError(f"{key}={value!r}: give a list, e.g. {key}=[a,b]")


def settings(cfg: DictConfig) -> Settings:
    """`cfg.analysis`, checked without loading any model: folders and files exist, numbers are in range,
    the neuron sets fit one another, the runs share one base model."""
    from neft_lab.config_checks import require_int, value_of

    section = cfg.get("analysis")
    if section is None:
        raise ConfigError("stage=analyze needs the analysis: section of conf/config.yaml")
    runs = [read_run(p) for p in _list(value_of(cfg, "analysis.runs"), "analysis.runs")]
    base_path = value_of(cfg, "analysis.base")
    base = read_run(base_path, "analysis.base") if base_path else None
    set_files = [_set_file(p) for p in _list(value_of(cfg, "analysis.sets"), "analysis.sets")]
    if not runs and not set_files:
        raise ConfigError(
            "stage=analyze needs analysis.runs=[<run folder>,...] and/or analysis.sets=[<neuron set>,...]"
        )
    if base is not None and not runs:
        raise ConfigError("analysis.base is the model the runs are compared with: give analysis.runs too")
    assign_labels(runs, _list(value_of(cfg, "analysis.labels"), "analysis.labels") or None)
    if runs:
        check_same_base(runs, base)
    if base is not None:  # named apart from the runs, which may include a run of the same method
        base.label = f"{method_label(base)} (reference)"
    split = value_of(cfg, "analysis.split")
    if split not in SPLITS:
        raise ConfigError(f"analysis.split={split!r}: choose one of {SPLITS}")
    tokens = value_of(cfg, "analysis.tokens")
    if tokens not in TOKENS:
        raise ConfigError(f"analysis.tokens={tokens!r}: choose one of {TOKENS}")
    aggregation = check_choice(value_of(cfg, "analysis.aggregation"), AGGREGATIONS, "analysis.aggregation")
    statistic = check_choice(value_of(cfg, "analysis.statistic"), STATISTICS, "analysis.statistic")
    layers = check_choice(value_of(cfg, "analysis.layers"), LAYERS, "analysis.layers")
    ranking = check_choice(value_of(cfg, "analysis.ranking"), RANKINGS, "analysis.ranking")
    bucket_scale = check_choice(
        value_of(cfg, "analysis.bucket_scale"), compare.BUCKET_SCALES, "analysis.bucket_scale"
    )
    max_sentences = (
        None
        if value_of(cfg, "analysis.max_sentences") is None
        else require_int(cfg, "analysis.max_sentences", 1, 200)
    )
    kinds = [str(k) for k in _list(value_of(cfg, "analysis.kinds"), "analysis.kinds")]
    if not kinds:
        raise ConfigError("analysis.kinds is empty: e.g. analysis.kinds=[up,down]")
    device = str(value_of(cfg, "analysis.device") or "auto")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"analysis.device={device!r}: auto, cpu or cuda")
    threshold = value_of(cfg, "analysis.threshold")
    compare.threshold_ranks(threshold, 1)  # the type and sign; in ranks once the number of vectors is known
    out = value_of(cfg, "analysis.out")
    first = runs[0].folder if runs else set_files[0].parent
    result = Settings(
        runs=runs,
        base=base,
        sets={_set_label(p, i): p for i, p in enumerate(set_files)},
        split=split,
        max_sentences=max_sentences,
        tokens=tokens,
        batch_size=require_int(cfg, "analysis.batch_size", 1, 8),
        kinds=kinds,
        statistic=statistic,
        layers=layers,
        aggregation=aggregation,
        ranking=ranking,
        threshold=threshold,
        buckets=compare.check_buckets(value_of(cfg, "analysis.buckets")),
        bucket_scale=bucket_scale,
        max_new_tokens=require_int(cfg, "analysis.max_new_tokens", 1, 1024),
        no_repeat_ngram_size=require_int(cfg, "analysis.no_repeat_ngram_size", 0, 4),
        out=Path(str(out)).expanduser() if out else first / "analysis",
        device=device,
        raw=OmegaConf.to_container(section, resolve=True),
    )
    all_sets(
        result
    )  # every neuron set loads and all fit one another (a set of another model is refused here)
    if _task_overridden():
        with_task = Task.from_config(cfg.task)
        with_task.check_folders()
    return result


def _set_file(path: Any) -> Path:
    try:
        return neuron_set_file(path)
    except ConfigError:
        raise ConfigError(
            f"analysis.sets: neuron set {path} does not exist: give a .safetensors file written by a NeFT run "
            "(<run>/neuron_set.safetensors) or by selection"
        ) from None


def _set_label(path: Path, index: int) -> str:
    return path.parent.name if path.name == "neuron_set.safetensors" else path.stem


def all_sets(s: Settings) -> dict[str, NeuronSet]:
    """The runs' neuron sets (labelled by run) and analysis.sets, checked to fit one another."""
    sets: dict[str, NeuronSet] = {}
    for run in s.runs:
        if run.neuron_set_file is not None:
            sets[run.label] = NeuronSet.load(run.neuron_set_file)
    for label, file in s.sets.items():
        name = label if label not in sets else f"{label} ({file})"
        sets[name] = NeuronSet.load(file)
    labels = list(sets)
    for label in labels[1:]:
        try:
            sets[labels[0]].check_same_space(sets[label].space, f"neuron set '{label}'")
        except ConfigError as err:
            raise ConfigError(f"analysis: the neuron sets do not fit one model: {err}") from None
    return sets


def _task_overridden() -> bool:
    from neft_lab.config import overridden

    return overridden("task")


# ---- the stage ----------------------------------------------------------------------------------------
def analyze(cfg: DictConfig) -> None:
    started = time.perf_counter()
    s = settings(cfg)  # (threads: set by the pipeline, neft_lab.threads)
    s.out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"settings": s.raw, "reference": None, "models": [], "comparisons": []}
    sets = all_sets(s)
    if s.runs:
        _analyze_runs(cfg, s, index, sets)
    if sets:
        overlap_data = overlap.matrices(sets)
        overlap_data["per_layer"] = {label: overlap.per_layer(ns) for label, ns in sets.items()}
        atomic_write_json(s.out / "overlap.json", overlap_data)
        index["sets"] = {label: str(ns.meta.get("method", "")) for label, ns in sets.items()}
    index["seconds"] = round(time.perf_counter() - started, 2)
    artifacts.write_index(s.out, index)
    figures = plots.draw_all(artifacts.load_analysis(s.out))
    _log_to_wandb(cfg, s, index, figures)
    _print_outcome(s, index, figures)


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"analysis.device={setting}: no CUDA device here; use analysis.device=cpu")
    return torch.device(setting)


def _analyze_runs(cfg: DictConfig, s: Settings, index: dict[str, Any], sets: dict[str, NeuronSet]) -> None:
    device = _device(s.device)
    first = s.runs[0]
    data_cfg = run_config(cfg, first)  # the first run's task unless task= is given
    task = Task.from_config(data_cfg.task)
    reference_label = "base" if s.base is None else s.base.label
    index["reference"] = reference_label
    sequences: list[list[int]] | None = None

    def measure(label: str, key: dict[str, Any], load: Any) -> UtilizationTable:
        nonlocal sequences
        file = s.out / "utilization" / f"{artifacts.slug(label)}.safetensors"
        if file.exists():
            try:
                cached = UtilizationTable.load(file)
                if cached.meta.get("key") == key:
                    logger.info("utilization of %s: reusing %s", label, file)
                    return cached
            except ConfigError:
                pass
        model, tokenizer = load()
        model.to(device)
        if sequences is None:
            sequences = split_sequences(
                task, tokenizer, s.split, s.max_sentences, s.tokens, data_cfg.model.chat_template, cfg.seed
            )
        started = time.perf_counter()
        generation = (
            Generation(s.max_new_tokens, s.no_repeat_ngram_size, _eos_ids(model, tokenizer))
            if s.tokens == "generated"
            else None
        )
        table = UtilizationTable.measure(
            model, sequences, pad_id(tokenizer), s.kinds, s.aggregation, s.batch_size,
            desc=f"utilization ({label})", progress=_progress(cfg),
            meta={"label": label, "key": key, "task": task.name, "split": s.split},
            statistic=s.statistic, layers=s.layers, generation=generation,
        )  # fmt: skip
        table.meta["seconds"] = round(time.perf_counter() - started, 2)
        table.save(file)
        logger.info("utilization of %s: %d vectors, %d tokens, %.1f s", label, table.num_vectors,
                    table.meta["tokens"], table.meta["seconds"])  # fmt: skip
        del model
        return table

    data_key = {"task": task.name, "data": task.data, "split": s.split, "max_sentences": s.max_sentences,
                "tokens": s.tokens, "kinds": s.kinds, "aggregation": s.aggregation, "statistic": s.statistic,
                "layers": s.layers}  # fmt: skip
    if s.split != "test":  # the validation split is held out of the training data by the seed
        data_key["seed"] = cfg.seed
    if s.tokens == "generated":  # each model's own output: how it was generated is part of the data
        data_key["generation"] = {
            "max_new_tokens": s.max_new_tokens,
            "no_repeat_ngram_size": s.no_repeat_ngram_size,
        }
    if s.base is None:
        reference = measure("base", {**data_key, "model": first.model_identity()},
                            lambda: load_base_model(cfg, first))  # fmt: skip
    else:
        reference = measure(reference_label, {**data_key, "model": _result_key(s.base)},
                            lambda: load_run_model(cfg, s.base))  # fmt: skip
    check_space(reference.space, sets)
    index["models"].append(_model_entry(reference_label, reference, s.base))
    threshold = compare.kind_thresholds(s.threshold, reference.space, s.ranking)
    rank_reference = reference.flat_ranks(s.ranking)
    for run in s.runs:
        table = measure(
            run.label, {**data_key, "model": _result_key(run)}, lambda run=run: load_run_model(cfg, run)
        )
        compare.check_same_space(reference.space, table.space, f"run {run.folder}")
        index["models"].append(_model_entry(run.label, table, run))
        mask = trained_mask(run, reference.space)
        rank_run = table.flat_ranks(s.ranking)
        summary = compare.compare(
            reference.space, rank_reference, rank_run, mask, threshold, s.buckets, ranking=s.ranking,
            scores_a=reference.flat_scores(), bucket_scale=s.bucket_scale,
        )  # fmt: skip
        summary = {
            "label": run.label,
            "run_dir": str(run.folder),
            "reference": reference_label,
            "reference_dir": None if s.base is None else str(s.base.folder),
            "threshold": s.threshold,
            "analysis_dir": str(s.out),
            **summary,
        }
        name = artifacts.slug(run.label)
        atomic_write_json(s.out / "compare" / f"{name}.json", summary)
        arrays = {
            "delta_rank": compare.delta_ranks(rank_reference, rank_run),
            "rank_reference": rank_reference,
            "rank_run": rank_run,
        }
        if mask is not None:
            arrays["trained"] = mask.to(torch.uint8)
        artifacts.save_tensors(arrays, s.out / "compare" / f"{name}.safetensors")
        if s.base is None:  # the run against its own base: what stage=report shows
            atomic_write_json(run.folder / "analysis" / SUMMARY, summary)
        index["comparisons"].append(
            {
                k: summary[k]
                for k in (
                    "label",
                    "run_dir",
                    "mean_abs_delta_rank",
                    "avg_delta_rank",
                    "spearman",
                    "counts",
                    "trained_vectors",
                    "threshold_ranks",
                )
            }  # fmt: skip
        )
        logger.info(
            "%s vs %s: mean |ΔRank| %.0f, strongly affected %s, suppressed %s, indirectly affected %s",
            run.label, reference_label, summary["mean_abs_delta_rank"], *(
                summary["counts"][c] for c in ("strongly_affected", "suppressed", "indirectly_affected")
            ),
        )  # fmt: skip


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Where greedy generation stops: the model's generation config's EOS ids and the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids})


def _result_key(run: Run) -> dict[str, Any]:
    """What identifies a run's trained weights: its folder and when its metrics.json was written."""
    metrics = run.folder / "metrics.json"
    return {
        "run": str(run.folder.resolve()),
        "finished": metrics.stat().st_mtime_ns if metrics.exists() else None,
    }


def _model_entry(label: str, table: UtilizationTable, run: Run | None) -> dict[str, Any]:
    return {
        "label": label,
        "run_dir": None if run is None else str(run.folder),
        "file": f"utilization/{artifacts.slug(label)}.safetensors",
        "tokens": table.meta.get("tokens"),
        "sentences": table.meta.get("sentences"),
        "seconds": table.meta.get("seconds"),
        "vectors": table.num_vectors,
        "per_layer_mean_score": table.per_layer(),
    }


def _progress(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True))


def _log_to_wandb(cfg: DictConfig, s: Settings, index: dict[str, Any], figures: list[Path]) -> None:
    """With `logger=wandb`: one W&B run (job_type analysis) with the PNGs and the headline numbers."""
    loggers = cfg.get("logger") or {}
    wb = next((c for c in loggers.values() if c and "Wandb" in str(c.get("_target_", ""))), None)
    if wb is None:
        return
    import wandb

    reference = index.get("reference") or "sets"
    run = wandb.init(
        project=wb.get("project"),
        entity=wb.get("entity"),
        group=str(cfg.get("experiment_name") or "analysis"),
        name=f"analyze-{reference}-vs-{'+'.join(r.label for r in s.runs) or 'sets'}",
        job_type="analysis",
        dir=str(s.out),
        mode="offline" if wb.get("offline") else "online",
        config={"analysis": s.raw},
        tags=["analysis"],
    )
    try:
        run.log({f"analysis/{p.stem}": wandb.Image(str(p)) for p in figures})
        for row in index["comparisons"]:
            prefix = f"analysis/{row['label']}"
            run.summary[f"{prefix}/mean_abs_delta_rank"] = row["mean_abs_delta_rank"]
            run.summary[f"{prefix}/avg_delta_rank"] = row["avg_delta_rank"]
            run.summary[f"{prefix}/spearman"] = row["spearman"]
            for category, n in row["counts"].items():
                if n is not None:
                    run.summary[f"{prefix}/{category}"] = n
    finally:
        run.finish()


def _print_outcome(s: Settings, index: dict[str, Any], figures: list[Path]) -> None:
    lines = [f"analysis in {s.out} ({len(figures)} figures, {index['seconds']:.0f} s)"]
    for row in index["comparisons"]:
        counts = row["counts"]
        lines.append(
            f"  {row['label']} vs {index['reference']}: mean |ΔRank| {row['mean_abs_delta_rank']:,.0f}, "
            f"Avg ΔRank (mean over kinds) {row['avg_delta_rank']:,.0f}, "
            f"strongly affected {counts['strongly_affected']:,}, suppressed {counts['suppressed']:,}, "
            f"indirectly affected {'–' if counts['indirectly_affected'] is None else format(counts['indirectly_affected'], ',')}"
            f" (threshold {_ranks_text(row['threshold_ranks'])})"
        )
    if index.get("sets"):
        lines.append(f"  neuron sets: {', '.join(index['sets'])} → overlap.json")
    logger.info("\n".join(lines))


def _ranks_text(threshold: int | dict[str, int]) -> str:
    if isinstance(threshold, dict):
        return ", ".join(f"{kind} {n:,}" for kind, n in threshold.items()) + " ranks"
    return f"{threshold:,} ranks"


def check_space(space: NeuronSpace, sets: dict[str, NeuronSet]) -> None:
    """Every neuron set of the analysed kinds fits the analysed model (a set chosen for another model is
    refused); a set with other kinds too (gate, attention) is left to the overlap analysis."""
    for label, neuron_set in sets.items():
        if set(neuron_set.space.kinds) <= set(space.kinds):
            try:
                neuron_set.check_same_space(space, "the analysed model")
            except ConfigError as err:
                raise ConfigError(f"analysis: neuron set '{label}': {err}") from None
