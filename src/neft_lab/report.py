"""`stage=report`: the paper's Table 2 from a folder of finished runs, and a budget-vs-score plot.

    python -m neft_lab stage=report report.dir=outputs/multiruns/<time>

Rows are methods (Full, FT-embed, FT-{in,out}, LoRA r=…, NeFT x%, Random x%, Reverse x%,
NeFT x%+Reversed y%, …), columns are tasks; a cell is the test metric's mean ± sample standard
deviation over the runs (seeds) of that method on that task, with their number. A line under the
table gives the sacreBLEU signature(s) of the BLEU columns (cased or lowercased, tokenizer). Every run is read through
`neft_lab.results.collect_runs`. Writes `<out>/table.md`, `<out>/table.csv` and
`<out>/budget_vs_score.png` (out defaults to `<dir>/report`) and prints the Markdown table. Runs analysed
by `stage=analyze` against their base model (`<run>/analysis/summary.json`) add the columns mean |ΔRank| and
the counts of strongly affected, suppressed and indirectly affected vectors (docs/analysis.md).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_savefig as _atomic_savefig  # a module name: tests wrap it
from neft_lab.io import atomic_write_text
from neft_lab.results import collect_runs
from neft_lab.significance import PairedResult

logger = logging.getLogger(__name__)

METRICS = {  # task kind → (metric key in metrics.json "after", column name); the test loss: lower is better
    "translation": [("bleu", "BLEU"), ("chrf", "chrF"), ("comet", "COMET"), ("loss", "test loss")],
    "summarization": [
        ("rouge1", "ROUGE-1"),
        ("rouge2", "ROUGE-2"),
        ("rougeL", "ROUGE-L"),
        ("loss", "test loss"),
    ],
    "instruction": [  # IFEval (docs/instruction.md): prompt- and instruction-level accuracy, strict and loose
        ("ifeval_prompt_strict", "IFEval prompt strict"),
        ("ifeval_prompt_loose", "IFEval prompt loose"),
        ("ifeval_inst_strict", "IFEval inst. strict"),
        ("ifeval_inst_loose", "IFEval inst. loose"),
    ],
}
MAIN_METRIC_ORDER = (
    "comet",
    "bleu",
    "rougeL",
    "ifeval_prompt_strict",
    "chrf",
)  # the pipeline's main metric, in order of preference
FAMILIES = (
    "Full",
    "FT-embed",
    "FT-{in,out}",
    "LoRA",
    "NeFT",
    "NeFT+Reversed",
    "Random",
    "Reverse",
    "NeFT (from file)",
    "NeFT (union)",
)
# runs pooled into one cell should agree on these (their training differs otherwise, not only in the seed)
POOLED_SETTINGS = ("lr", "steps_configured", "batch_size", "group_by_length")


@dataclass(frozen=True)
class Method:
    family: str  # one line of the plot: Full, LoRA, NeFT, Random, Reverse, ...
    label: str  # one row of the table: "NeFT 9%", "LoRA r=8", ...
    order: tuple = ()  # sort key within the family (budget, rank)


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[Any]) -> Stat:
        xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        xs = [x for x in xs if math.isfinite(x)]
        if not xs:
            return cls(None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    def cell(self, digits: int = 2) -> str:
        if self.mean is None:
            return "–"
        if self.std is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


@dataclass
class Row:
    """One method on one model: its runs by task."""

    model: str
    method: Method
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    @property
    def all_runs(self) -> list[dict[str, Any]]:
        return [r for runs in self.runs.values() for r in runs]


# ---- runs and their method labels --------------------------------------------------------------------
def runs_folder(root: Path) -> Path:
    """`report.dir`, which must be an existing folder."""
    if not root.exists():
        raise ConfigError(f"report.dir={root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"report.dir={root} is not a folder")
    return root


def report_root(cfg: DictConfig) -> Path:
    """The folder of runs `stage=report` reads (`report.dir`), checked to exist."""
    settings = cfg.get("report") or {}
    if not settings.get("dir"):
        raise ConfigError("stage=report needs report.dir=<a multirun folder or any folder of runs>")
    return runs_folder(Path(str(settings.dir)).expanduser())


def load_runs(root: Path) -> list[dict[str, Any]]:
    """The training runs under `root` (stage=eval re-scores, which have no strategy, are left out)."""
    runs_folder(root)
    rows = collect_runs(root)
    if not rows:
        raise ConfigError(
            f"no metrics.json found under {root}: point report.dir at a multirun folder "
            "(outputs/multiruns/<time>) or any folder with finished runs below it"
        )
    trained = [r for r in rows if r.get("strategy")]
    if len(trained) < len(rows):
        logger.info("report: left out %d run(s) without a strategy (stage=eval)", len(rows) - len(trained))
    if not trained:
        raise ConfigError(
            f"the {len(rows)} metrics.json under {root} are all from stage=eval: no training runs"
        )
    return [_with_analysis(r) for r in trained]


# stage=analyze writes <run>/analysis/summary.json (the run against its base model): key there → column
ANALYSIS_COLUMNS = {
    "mean_abs_delta_rank": ("mean abs ΔRank", ".1f"),
    "strongly_affected": ("strongly affected", ".0f"),
    "suppressed": ("suppressed", ".0f"),
    "indirectly_affected": ("indirectly affected", ".0f"),
}


def _with_analysis(run: dict[str, Any]) -> dict[str, Any]:
    """The run's row plus `analysis_<key>` for the ANALYSIS_COLUMNS, when the run has an analysis."""
    file = Path(run.get("run_dir", "")) / "analysis" / "summary.json"
    try:
        summary = json.loads(file.read_text()) if file.is_file() else None
    except (OSError, ValueError):
        logger.warning("report: %s is not readable JSON; no analysis columns for that run", file)
        summary = None
    if isinstance(summary, dict):
        values = {**(summary.get("counts") or {}), "mean_abs_delta_rank": summary.get("mean_abs_delta_rank")}
        run.update({f"analysis_{k}": values.get(k) for k in ANALYSIS_COLUMNS})
    return run


def percent(share: Any) -> str:
    """A share of all parameters as the paper writes it: 0.09 → '9%', 0.005 → '0.5%'."""
    return f"{100 * float(share):.3g}%"


def budget_label(run: dict[str, Any]) -> str:
    kind, value = run.get("budget_kind", "share"), run.get("budget_value")
    if value is None:
        return percent(run["neuron_percent"] / 100) if run.get("neuron_percent") is not None else ""
    if kind == "lora_rank":
        return f"≈LoRA r={int(value)}"
    if kind == "vectors":
        return f"{int(value)} vectors"
    return percent(value)


# as selection_workflow.py: the methods that rank by a scorer, the scorers whose scores come from a reference run
SCORED_METHODS = ("cosine", "reverse", "cosine_plus_reverse")
REFERENCE_SCORERS = ("cosine", "lora_reference")
PAPER_MODULES = ("up", "down")


def selection_setting(run: dict[str, Any], key: str) -> Any:
    """A setting that defines a NeFT method (scorer, method, pooling, modules, reference_steps, reference_horizon):
    as metrics.json's `selection_settings` recorded it (the neuron set's own record), else from the run's
    config.yaml (runs from before metrics.json recorded it)."""
    recorded = f"selection_settings_{key}"
    if recorded in run:
        return run[recorded]
    return run.get({"method": "selection_method"}.get(key, key))


def _modules(run: dict[str, Any]) -> tuple[str, ...]:
    value = selection_setting(run, "modules")
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    return tuple(str(v) for v in value) if value else PAPER_MODULES


def _scorer(run: dict[str, Any], selection: str | None) -> str | None:
    """The scorer that ranked a scored method's vectors (cosine: the paper's; None for random or a file)."""
    if selection not in SCORED_METHODS:
        return None
    return str(selection_setting(run, "scorer") or "cosine")


def selection_qualifiers(run: dict[str, Any], selection: str | None) -> list[str]:
    """What sets a NeFT run apart from the paper's selection of that name: another scorer, per-layer pooling,
    other neuron kinds (the reference's K and horizon: `reference_qualifier`, where runs differ in them)."""
    if selection in (None, "from_file", "union"):
        return []
    out = []
    scorer = _scorer(run, selection)
    if scorer not in (None, "cosine"):
        out.append(scorer)
    pooling = selection_setting(run, "pooling")
    if pooling not in (None, "global"):
        out.append(str(pooling))
    modules = _modules(run)
    if modules != PAPER_MODULES:
        out.append("/".join(modules))
    return out


def reference_of(run: dict[str, Any]) -> tuple[Any, Any] | None:
    """(K, horizon) of the reference run that scored a run's vectors; None when no reference scored them."""
    selection = run.get("selection_settings_method") or run.get("selection_method") or run.get("selection")
    if _scorer(run, selection) not in REFERENCE_SCORERS:
        return None
    return selection_setting(run, "reference_steps"), selection_setting(run, "reference_horizon")


def reference_qualifier(reference: tuple[Any, Any] | None) -> str:
    steps, horizon = reference or (None, None)
    text = f"K={steps if steps is not None else '?'}"
    return f"{text}, horizon {horizon}" if horizon else text


def _qualified(method: Method, qualifiers: list[str]) -> Method:
    if not qualifiers:
        return method
    extra = ", ".join(qualifiers)
    return Method(f"{method.family} ({extra})", f"{method.label} ({extra})", method.order)


def method_of(run: dict[str, Any], extra: list[str] | None = None) -> Method:
    """The table row of a run, from its strategy, selection (scorer, method, pooling, modules), budget and LoRA
    rank; `extra`: more qualifiers (group_rows adds the reference's K where runs differ in it)."""
    strategy = run.get("strategy") or run.get("strategy_name") or "?"
    selection = run.get("selection_settings_method") or run.get("selection_method") or run.get("selection")
    return _qualified(
        _method_of(run, strategy, selection), selection_qualifiers(run, selection) + (extra or [])
    )


def _method_of(run: dict[str, Any], strategy: str, selection: str | None) -> Method:
    value = run.get("budget_value")
    order = (float(value),) if isinstance(value, (int, float)) else ()
    actual = run.get("neuron_percent")
    if strategy == "full":
        return Method("Full", "Full")
    if isinstance(run.get("trains"), list) and run["trains"]:  # strategies/partial.py: whole matrices
        label = partial_label(run["trains"])
        return Method(label, label)
    if strategy == "lora":
        r = run.get("lora_r")
        if isinstance(r, int):
            return Method("LoRA", f"LoRA r={r}", (r,))
        share = run.get("budget_share")
        return Method("LoRA", f"LoRA r={r} ({percent(share)})" if r == "match" and share else f"LoRA r={r}")
    if selection == "cosine":
        return Method("NeFT", f"NeFT {budget_label(run)}", order)
    if selection == "random":
        return Method("Random", f"Random {budget_label(run)}", order)
    if selection == "reverse":
        return Method("Reverse", f"Reverse {budget_label(run)}", order)
    if selection == "cosine_plus_reverse":
        extra = run.get("reverse_share") or 0
        return Method("NeFT+Reversed", f"NeFT {budget_label(run)}+Reversed {percent(extra)}", (*order, extra))
    if selection in ("from_file", "union"):
        family = "NeFT (from file)" if selection == "from_file" else "NeFT (union)"
        size = percent(actual / 100) if actual is not None else ""
        return Method(family, f"{family} {size}".strip(), (actual or 0,))
    return Method(strategy, f"{strategy} {budget_label(run)}".strip() if selection else strategy, order)


def partial_label(parts: list[str]) -> str:
    """The paper's name for a dense partial fine-tune: [embed] → FT-embed, [up, down] → FT-{in,out}."""
    names = [{"up": "in", "down": "out"}.get(str(p), str(p)) for p in parts]
    return f"FT-{names[0]}" if len(names) == 1 else "FT-{" + ",".join(names) + "}"


def task_kind(runs: list[dict[str, Any]]) -> str:
    kinds = {r.get("task_kind") for r in runs} - {None}
    if len(kinds) == 1:
        return kinds.pop()
    if any(r.get("after_bleu") is not None or r.get("after_chrf") is not None for r in runs):
        return "translation"
    if any(r.get("after_rougeL") is not None for r in runs):
        return "summarization"
    return "other"


def task_metrics(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The metric columns of a task that at least one run has (COMET only where it was computed)."""
    kind = task_kind(runs)
    candidates = METRICS.get(kind) or [
        (k.removeprefix("after_"), k.removeprefix("after_"))
        for k in sorted(
            {k for r in runs for k, v in r.items() if k.startswith("after_") and not isinstance(v, str)}
        )
        if k not in ("after_n", "after_seconds")
    ]
    return [(k, name) for k, name in candidates if any(r.get(f"after_{k}") is not None for r in runs)]


# ---- the table ---------------------------------------------------------------------------------------
def group_rows(runs: list[dict[str, Any]]) -> list[Row]:
    """Runs by (model, method) and task, in the paper's order: Full, LoRA, NeFT, ..."""
    rows: dict[tuple[str, str], Row] = {}
    references: dict[str, set[str]] = defaultdict(set)  # label → the reference runs (K, horizon) behind it
    for run in runs:
        if (reference := reference_of(run)) is not None:
            references[method_of(run).label].add(reference_qualifier(reference))
    for run in runs:
        method = method_of(run)
        # scored against references of different K (or horizon): not one method
        if len(references.get(method.label, ())) > 1:
            method = method_of(run, [reference_qualifier(reference_of(run))])
        model = str(run.get("model", "?"))
        row = rows.setdefault((model, method.label), Row(model, method))
        row.runs[str(run.get("task", "?"))].append(run)
    ordered = sorted(
        rows.values(), key=lambda r: (r.model, _family_rank(r.method.family), r.method.order, r.method.label)
    )
    for row in ordered:
        _warn_pooled(row)
    return ordered


def _family_rank(family: str) -> tuple[int, str]:
    base = family if family in FAMILIES else family.split(" (")[0]  # "NeFT (gradient)" after "NeFT"
    return (FAMILIES.index(base), family) if base in FAMILIES else (len(FAMILIES), family)


def _warn_pooled(row: Row) -> None:
    for task, runs in row.runs.items():
        for key in POOLED_SETTINGS:
            values = {str(r.get(key)) for r in runs}
            if len(values) > 1:
                logger.warning(
                    "report: the %d runs of '%s' on %s differ in %s (%s) and are pooled into one cell",
                    len(runs),
                    row.method.label,
                    task,
                    key,
                    ", ".join(sorted(values)),
                )
        seeds = [r.get("seed") for r in runs]
        if len(set(seeds)) < len(seeds):
            logger.warning(
                "report: '%s' on %s has repeated seeds %s: the cell's n=%d counts every run, though runs of one "
                "seed are not independent samples (reruns? keep one per seed)",
                row.method.label,
                task,
                seeds,
                len(runs),
            )


@dataclass
class Comparison:
    """Every method against `baseline` (report.baseline), per task and metric: `neft_lab.significance`."""

    baseline: str
    alpha: float
    samples: int
    results: dict[tuple[str, str, str, str], PairedResult] = field(
        default_factory=dict
    )  # (model, label, task, metric)
    skipped: list[str] = field(default_factory=list)  # why a method/task has no test

    def result(self, row: Row, task: str, metric: str) -> PairedResult | None:
        return self.results.get((row.model, row.method.label, task, metric))

    def marker(self, row: Row, task: str, metric: str) -> str:
        found = self.result(row, task, metric)
        return " *" if found is not None and found.significant(self.alpha) else ""


@dataclass
class Table:
    rows: list[Row]
    tasks: list[str]
    metrics: dict[str, list[tuple[str, str]]]  # task → its metric columns
    show_model: bool
    bleu_signatures: dict[str, dict[str, int]] = field(default_factory=dict)  # see bleu_signatures()
    comparison: Comparison | None = None  # report.baseline: paired bootstrap against one method

    def stat(self, row: Row, task: str, metric: str) -> Stat:
        return Stat.of([r.get(f"after_{metric}") for r in row.runs.get(task, [])])

    @staticmethod
    def trainable_percent(row: Row) -> Stat:
        return Stat.of([r.get("trainable_percent") for r in row.all_runs])

    @staticmethod
    def step_seconds(row: Row) -> float | None:
        """The median over the row's runs of each run's median `train/step_seconds`."""
        values = [r["train_step_seconds_median"] for r in row.all_runs if r.get("train_step_seconds_median")]
        return statistics.median(values) if values else None

    @staticmethod
    def analysis(row: Row, key: str) -> float | None:
        """The mean over the row's analysed runs of an ANALYSIS_COLUMNS value (stage=analyze)."""
        return Stat.of([r.get(f"analysis_{key}") for r in row.all_runs]).mean

    @property
    def has_analysis(self) -> bool:
        return any(k.startswith("analysis_") for row in self.rows for r in row.all_runs for k in r)

    @staticmethod
    def wall_minutes(row: Row) -> float | None:
        """The mean over the row's runs of each run's whole wall time (load, train, evaluate), in minutes."""
        mean = Stat.of([r.get("wall_seconds") for r in row.all_runs]).mean
        return None if mean is None else mean / 60

    @staticmethod
    def peak_memory_gib(row: Row) -> float | None:
        """The largest peak over the row's runs."""
        values = [r["train_peak_memory_bytes"] for r in row.all_runs if r.get("train_peak_memory_bytes")]
        return max(values) / 2**30 if values else None


def build_table(runs: list[dict[str, Any]]) -> Table:
    rows = group_rows(runs)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_task[str(run.get("task", "?"))].append(run)
    tasks = sorted(by_task)
    return Table(
        rows=rows,
        tasks=tasks,
        metrics={t: task_metrics(by_task[t]) for t in tasks},
        show_model=len({r.model for r in rows}) > 1,
        bleu_signatures=bleu_signatures(runs),
    )


UNSIGNED = ""  # runs scored before metrics.json recorded the signature: cased BLEU, tokenizer zh or 13a


def bleu_signatures(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """sacreBLEU signature → task → number of runs with BLEU scored that way, so the report says which BLEU it shows.

    Lowercased and cased BLEU (or two tokenizers) are different numbers; a task whose runs
    disagree pools incomparable scores into one cell, which is logged as a warning.
    """
    found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for run in runs:
        if run.get("after_bleu") is not None:
            found[str(run.get("after_bleu_signature") or UNSIGNED)][str(run.get("task", "?"))] += 1
    for task in sorted({t for tasks in found.values() for t in tasks}):
        kinds = sorted(sig or "not recorded" for sig, tasks in found.items() if task in tasks)
        if len(kinds) > 1:
            logger.warning("report: the BLEU of %s pools runs scored differently: %s", task, "; ".join(kinds))
    return {sig: dict(tasks) for sig, tasks in found.items()}


def bleu_note(signatures: dict[str, dict[str, int]]) -> str:
    """The line under the table that says which BLEU it shows (or, when runs differ, which run used which)."""

    def name(sig: str) -> str:
        return f"`{sig}`" if sig else "not recorded (scored before signatures were: cased, tok zh or 13a)"

    if not signatures:
        return ""
    if len(signatures) == 1:
        return f"BLEU (sacreBLEU): {name(next(iter(signatures)))}\n"
    lines = ["BLEU (sacreBLEU): the runs used different signatures:"]
    for sig, tasks in sorted(signatures.items()):
        where = ", ".join(f"{t} ({n} run{'s' if n > 1 else ''})" for t, n in sorted(tasks.items()))
        lines.append(f"- {name(sig)}: {where}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def learning_rates(row: Row) -> str:
    """The lr(s) a row's runs trained with (optim.lr of their config.yaml), e.g. '2e-05' or '0.0001, 0.0002'."""
    values = sorted({float(r["lr"]) for r in row.all_runs if isinstance(r.get("lr"), (int, float))})
    return ", ".join(f"{v:.3g}" for v in values) or "–"


def lr_column(table: Table) -> bool:
    """An lr column when the methods trained with different learning rates (tuned per method: lr_search.py);
    otherwise the one learning rate is a line under the table."""
    return len({learning_rates(row) for row in table.rows}) > 1


def lr_note(table: Table) -> str:
    rates = {learning_rates(row) for row in table.rows}
    return "" if len(rates) != 1 or rates == {"–"} else f"Learning rate: {rates.pop()} (every run)\n"


def to_markdown(table: Table) -> str:
    header = ["method"] + (["model"] if table.show_model else []) + (["lr"] if lr_column(table) else [])
    for task in table.tasks:
        header += [f"{task} {name}" for _, name in table.metrics[task]]
    header += ["trainable %", "step s (median)", "wall min", "peak mem GiB", "runs"]
    header += [name for name, _ in ANALYSIS_COLUMNS.values()] if table.has_analysis else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        cells = [row.method.label] + ([row.model] if table.show_model else [])
        cells += [learning_rates(row)] if lr_column(table) else []
        for task in table.tasks:
            cells += [
                table.stat(row, task, key).cell()
                + (table.comparison.marker(row, task, key) if table.comparison else "")
                for key, _ in table.metrics[task]
            ]
        cells += [
            _fmt(table.trainable_percent(row).mean, ".3g"),
            _fmt(table.step_seconds(row), ".3g"),
            _fmt(table.wall_minutes(row), ".3g"),
            _fmt(table.peak_memory_gib(row), ".2f"),
            str(len(row.all_runs)),
        ]
        if table.has_analysis:
            cells += [_fmt(table.analysis(row, key), spec) for key, (_, spec) in ANALYSIS_COLUMNS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    note = lr_note(table) + bleu_note(table.bleu_signatures)
    if table.comparison is not None and table.comparison.results:
        note += (
            f"* p < {table.comparison.alpha:g} against {table.comparison.baseline} "
            "(paired bootstrap over test segments, seeds paired; the table below)\n"
        )
    return "\n".join(lines) + "\n" + (f"\n{note}" if note else "") + significance_markdown(table)


def to_csv(table: Table) -> str:
    """The same table with plain numbers: `<task>/<metric>/mean|std|n` per cell."""
    header = ["method", "family", "model"]
    for task in table.tasks:
        header += [f"{task}/{key}/{part}" for key, _ in table.metrics[task] for part in ("mean", "std", "n")]
        if table.comparison is not None:
            header += [
                f"{task}/{key}/{part}"
                for key, _ in table.metrics[task]
                if key in SIGNIFICANCE_METRICS
                for part in ("delta", "ci_low", "ci_high", "p")
            ]
    header += [
        "trainable_percent",
        "step_seconds_median",
        "wall_minutes_mean",
        "peak_memory_gib",
        "runs",
        "seeds",
        "lr",
    ]
    header += [f"analysis_{key}" for key in ANALYSIS_COLUMNS] if table.has_analysis else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        cells: list[Any] = [row.method.label, row.method.family, row.model]
        for task in table.tasks:
            for key, _ in table.metrics[task]:
                stat = table.stat(row, task, key)
                cells += [_num(stat.mean), _num(stat.std), stat.n]
            if table.comparison is not None:
                for key, _ in table.metrics[task]:
                    if key in SIGNIFICANCE_METRICS:
                        found = table.comparison.result(row, task, key)
                        cells += (
                            ["", "", "", ""]
                            if found is None
                            else [
                                _num(found.delta),
                                _num(found.ci_low),
                                _num(found.ci_high),
                                _num(found.p_value),
                            ]
                        )
        seeds = sorted({r.get("seed") for r in row.all_runs}, key=str)
        cells += [
            _num(table.trainable_percent(row).mean),
            _num(table.step_seconds(row)),
            _num(table.wall_minutes(row)),
            _num(table.peak_memory_gib(row)),
            len(row.all_runs),
            " ".join(str(s) for s in seeds),
            learning_rates(row),
        ]
        if table.has_analysis:
            cells += [_num(table.analysis(row, key)) for key in ANALYSIS_COLUMNS]
        writer.writerow(cells)
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


# ---- significance against a baseline -------------------------------------------------------------------
def baseline_rows(table: Table, name: str) -> dict[str, Row]:
    """The baseline method per model: `name` is a row label ("NeFT 9%", any case) or a strategy name (neft)
    that exactly one method uses."""
    wanted = str(name).strip().lower()
    labels = sorted({row.method.label for row in table.rows})
    chosen = [row for row in table.rows if row.method.label.lower() == wanted]
    if not chosen:
        by_strategy = {
            row.method.label
            for row in table.rows
            if any(
                str(r.get("strategy_name") or r.get("strategy") or "").lower() == wanted for r in row.all_runs
            )
        }
        if len(by_strategy) > 1:
            raise ConfigError(
                f"report.baseline={name}: {len(by_strategy)} methods use that strategy ({', '.join(sorted(by_strategy))}): "
                f"name one, e.g. report.baseline='{sorted(by_strategy)[0]}'"
            )
        chosen = [row for row in table.rows if row.method.label in by_strategy]
    if not chosen:
        raise ConfigError(
            f"report.baseline={name}: no such method here; the methods are: {', '.join(labels)}"
        )
    return {row.model: row for row in chosen}


def compare_to_baseline(table: Table, name: str, samples: int = 1000, alpha: float = 0.05) -> Comparison:
    """Paired bootstrap of every other method against the baseline, per task and per metric with segment
    statistics (BLEU, chrF, ROUGE, test loss), seed i paired with seed i (`neft_lab.significance`)."""
    from neft_lab import significance

    bases = baseline_rows(table, name)
    comparison = Comparison(next(iter(bases.values())).method.label, alpha, samples)
    cache: dict[str, list[dict[str, Any]] | None] = {}
    for row in table.rows:
        base = bases.get(row.model)
        if base is None or base is row:
            continue
        for task in table.tasks:
            pairs = _seed_pairs(base.runs.get(task, []), row.runs.get(task, []))
            if not pairs:
                if row.runs.get(task) and base.runs.get(task):
                    comparison.skipped.append(
                        f"{row.method.label} on {task}: no seed shared with the baseline"
                    )
                continue
            predictions = [[_predictions(r, cache) for r in pair] for pair in pairs]
            if any(p is None for pair in predictions for p in pair):
                comparison.skipped.append(f"{row.method.label} on {task}: a run has no predictions.jsonl")
                continue
            if not significance.same_test_set([p for pair in predictions for p in pair]):
                comparison.skipped.append(
                    f"{row.method.label} on {task}: the runs scored different test sets"
                )
                continue
            first = pairs[0][0]
            for key, _ in table.metrics[task]:
                if key not in SIGNIFICANCE_METRICS or not all(
                    significance.has_statistics(key, p) for pair in predictions for p in pair
                ):
                    continue
                metric = significance.segment_metric(
                    key, str(first.get("target_lang") or "en"), bool(first.get("bleu_lowercase") or False)
                )
                comparison.results[(row.model, row.method.label, task, key)] = significance.paired_bootstrap(
                    metric, [b for b, _ in predictions], [m for _, m in predictions], samples
                )
    for line in comparison.skipped:
        logger.warning("report: no significance test for %s", line)
    return comparison


SIGNIFICANCE_METRICS = (
    "bleu", "chrf", "rouge1", "rouge2", "rougeL", "loss",
    "ifeval_prompt_strict", "ifeval_prompt_loose", "ifeval_inst_strict", "ifeval_inst_loose",
)  # fmt: skip


def _seed_pairs(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(baseline run, method run) of each seed both have, in seed order."""
    base_by_seed = {r.get("seed"): r for r in base}
    other_by_seed = {r.get("seed"): r for r in other}
    shared = sorted(set(base_by_seed) & set(other_by_seed), key=str)
    return [(base_by_seed[s], other_by_seed[s]) for s in shared]


def _predictions(
    run: dict[str, Any], cache: dict[str, list[dict[str, Any]] | None]
) -> list[dict[str, Any]] | None:
    path = Path(str(run.get("run_dir", ""))) / "predictions.jsonl"
    if str(path) not in cache:
        try:
            cache[str(path)] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            cache[str(path)] = None
    return cache[str(path)]


def significance_markdown(table: Table) -> str:
    """The paired tests as a second table: Δ (method − baseline) [95% CI], p, per task and metric."""
    comparison = table.comparison
    if comparison is None or not comparison.results:
        return ""
    columns = [(t, k, n) for t in table.tasks for k, n in table.metrics[t] if k in SIGNIFICANCE_METRICS]
    columns = [c for c in columns if any(key[2:] == c[:2] for key in comparison.results)]
    header = (
        ["method"]
        + (["model"] if table.show_model else [])
        + [f"{t} {n}: Δ [95% CI], p" for t, _, n in columns]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        found = [comparison.result(row, t, k) for t, k, _ in columns]
        if not any(found):
            continue
        cells = [row.method.label] + ([row.model] if table.show_model else [])
        for result in found:
            cells.append("–" if result is None else _significance_cell(result, comparison.alpha))
        lines.append("| " + " | ".join(cells) + " |")
    pairs = sorted({r.pairs for r in comparison.results.values()})
    segments = sorted({r.segments for r in comparison.results.values()})
    return (
        f"\nPaired bootstrap against **{comparison.baseline}** (Δ = method − baseline, mean over "
        f"{'/'.join(map(str, pairs))} seed pair(s); {comparison.samples} resamples of the "
        f"{'/'.join(map(str, segments))} test segments; * p < {comparison.alpha:g}; lower test loss is better):\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _significance_cell(result: PairedResult, alpha: float) -> str:
    mark = " *" if result.significant(alpha) else ""
    return (
        f"{result.delta:+.2f} [{result.ci_low:+.2f}, {result.ci_high:+.2f}], p={p_text(result.p_value)}{mark}"
    )


def p_text(p: float) -> str:
    """A p-value to 3 decimals, or more where 3 would hide which side of 0.05 (0.01, 0.001) it falls on:
    50 of 1,000 resamples give 0.04995, which is below 0.05, not "0.050"."""
    for decimals in range(3, 9):
        shown = f"{p:.{decimals}f}"
        if not any(float(shown) == a != p for a in (0.05, 0.01, 0.001)):
            return shown
    return f"{p:.3g}"


# ---- the plot ----------------------------------------------------------------------------------------
def plot_metric(table: Table, task: str, requested: str | None) -> str | None:
    """The plot's y axis for a task: report.metric if the task has it, else its main metric."""
    keys = [k for k, _ in table.metrics[task]]
    if requested:
        return requested if requested in keys else None
    return next((k for k in MAIN_METRIC_ORDER if k in keys), keys[0] if keys else None)


def plot_budget_vs_score(table: Table, path: Path, requested: str | None = None) -> Path:
    """Score against trainable % of all parameters (log x), one line per method family and panel per task."""
    return _atomic_savefig(budget_vs_score_figure(table, requested), path)


def budget_vs_score_figure(table: Table, requested: str | None = None) -> Any:
    """The matplotlib Figure `plot_budget_vs_score` saves. A family with one point is drawn as a marker;
    Full is a dashed line across the panel plus a marker at its own trainable %; the x range spans every
    point with a margin (a single point alone would collapse a log axis to one value)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    ncols = min(len(table.tasks), 3)
    nrows = math.ceil(len(table.tasks) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    order = ("NeFT", "Random", "Reverse", "LoRA", "NeFT+Reversed", "NeFT (from file)", "NeFT (union)")
    colors = {family: f"C{i}" for i, family in enumerate(order)}  # the same colour in every report
    names = {k: name for columns in METRICS.values() for k, name in columns}
    for ax, task in zip(axes, table.tasks):
        metric = plot_metric(table, task, requested)
        ax.set_title(task)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters, % of all (log scale)")
        for axis_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))
        if metric is None:
            ax.text(0.5, 0.5, f"no {requested} for this task", ha="center", transform=ax.transAxes)
            continue
        ax.set_ylabel(names.get(metric, metric))
        xs: list[float] = []
        for family, points in _family_points(table, task, metric).items():
            color = colors.setdefault(family, f"C{len(colors)}")
            xs += [x for x, _ in points]
            if family == "Full":
                for x, stat in points:
                    ax.axhline(stat.mean, linestyle="--", color="black", label="Full")
                    ax.plot([x], [stat.mean], marker="*", markersize=10, linestyle="none", color="black")
                    if stat.std:
                        ax.axhspan(stat.mean - stat.std, stat.mean + stat.std, color="black", alpha=0.08)
                continue
            points.sort(key=lambda p: p[0])
            ax.errorbar(
                [x for x, _ in points],
                [s.mean for _, s in points],
                yerr=[s.std or 0.0 for _, s in points],
                marker="o",
                markersize=6,
                capsize=3,
                color=color,
                label=family,
            )
        if xs:  # log x: a factor of margin either side, wider when all points share one x
            low, high = min(xs), max(xs)
            pad = 1.5 if high / low > 1.5 else 3.0
            ax.set_xlim(low / pad, high * pad)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(table.tasks) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _family_points(table: Table, task: str, metric: str) -> dict[str, list[tuple[float, Stat]]]:
    """Family → (mean trainable %, score stat) for each of its rows that has this task and metric."""
    points: dict[str, list[tuple[float, Stat]]] = defaultdict(list)
    for row in table.rows:
        stat = table.stat(row, task, metric)
        x = Stat.of([r.get("trainable_percent") for r in row.runs.get(task, [])]).mean
        if stat.mean is not None and x:
            family = row.method.family
            if table.show_model and family != "Full":
                family = f"{family} ({row.model})"
            points[family].append((x, stat))
    return points


# ---- the stage ---------------------------------------------------------------------------------------
def report(cfg: DictConfig) -> None:
    settings = cfg.get("report") or {}
    root = report_root(cfg)
    out = Path(str(settings.out)).expanduser() if settings.get("out") else root / "report"
    runs = load_runs(root)
    table = build_table(runs)
    requested = settings.get("metric")
    if requested and not any(requested in [k for k, _ in m] for m in table.metrics.values()):
        known = sorted({k for m in table.metrics.values() for k, _ in m})
        raise ConfigError(f"report.metric={requested}: no run has it; these runs have {known}")
    if settings.get("baseline"):
        table.comparison = compare_to_baseline(
            table,
            str(settings.baseline),
            int(settings.get("samples") or 1000),
            float(settings.get("alpha") or 0.05),
        )
    markdown = to_markdown(table)
    atomic_write_text(out / "table.md", markdown)
    atomic_write_text(out / "table.csv", to_csv(table))
    plot_budget_vs_score(table, out / "budget_vs_score.png", requested)
    plot_convergence(table, out / "convergence.png")
    print(markdown, flush=True)
    if settings.get("wandb"):
        log_report_to_wandb(cfg, table, out)
    logger.info(
        "report: %d runs, %d methods, %d task(s) → %s (table.md, table.csv, budget_vs_score.png, convergence.png)",
        len(runs),
        len(table.rows),
        len(table.tasks),
        out,
    )


def plot_convergence(table: Table, path: Path) -> Path:
    """Validation loss against step per method and task (`neft_lab.curves`), from the runs' own logs."""
    from neft_lab.curves import curves_figure

    panels = {
        task: {
            (f"{row.method.label} ({row.model})" if table.show_model else row.method.label): [
                r["run_dir"] for r in row.runs[task]
            ]
            for row in table.rows
            if row.runs.get(task)
        }
        for task in table.tasks
    }
    return _atomic_savefig(curves_figure(panels), path)


def wandb_summary(table: Table) -> dict[str, Any]:
    """The report as W&B summary values: `<method>/<task>/<metric>` mean, and against the baseline
    `.../delta`, `.../p` and `.../significant`."""
    summary: dict[str, Any] = {}
    for row in table.rows:
        prefix = f"{row.method.label} ({row.model})" if table.show_model else row.method.label
        for task in table.tasks:
            for key, _ in table.metrics[task]:
                stat = table.stat(row, task, key)
                if stat.mean is not None:
                    summary[f"{prefix}/{task}/{key}"] = stat.mean
                found = table.comparison.result(row, task, key) if table.comparison else None
                if found is not None:
                    summary[f"{prefix}/{task}/{key}/delta"] = found.delta
                    summary[f"{prefix}/{task}/{key}/p"] = found.p_value
                    summary[f"{prefix}/{task}/{key}/significant"] = found.significant(table.comparison.alpha)
    if table.comparison is not None:
        summary["baseline"] = table.comparison.baseline
    return summary


def log_report_to_wandb(cfg: DictConfig, table: Table, out: Path) -> None:
    """`report.wandb=true`: one W&B run (job_type=report) with the table, the plots and `wandb_summary`
    (offline unless credentials exist, as for training runs)."""
    import wandb

    from neft_lab.config import wandb_offline

    run = wandb.init(
        project=str(OmegaConf.select(cfg, "logger.wandb.project", default="neft_lab") or "neft_lab"),
        group=str(OmegaConf.select(cfg, "experiment_name", default="report") or "report"),
        job_type="report",
        name=f"report-{out.parent.name}",
        dir=str(out),
        mode="offline" if wandb_offline() else "online",
    )
    try:
        rows = list(csv.reader(io.StringIO(to_csv(table))))
        run.log({"report/table": wandb.Table(columns=rows[0], data=rows[1:])})
        for name in ("budget_vs_score.png", "convergence.png"):
            if (out / name).exists():
                run.log({f"report/{name.removesuffix('.png')}": wandb.Image(str(out / name))})
        run.summary.update(wandb_summary(table))
    finally:
        run.finish()
