"""Is a method's difference from a baseline larger than chance? Paired bootstrap over test segments, seeds paired.

The test set is the sample: a resample draws its segments with replacement, and the *same* segments are scored
for both methods and every seed, so what varies is which sentences were tested, not how the runs were paired.
Seed i of a method is paired with seed i of the baseline (runs that share a test set); the difference of one
resample is the mean over seed pairs of (method − baseline), so the observed difference is exactly the difference
of the table's seed means. With one seed pair this *is* sacreBLEU's paired bootstrap (`sacrebleu --paired-bs`):
the same resampling indices (seed 12345, `SACREBLEU_SEED`), the same statistics per segment, the same p-value
(two-sided, from the resampled |differences| shifted to mean zero, `sacrebleu.significance`). The 95% interval is
the 2.5–97.5 percentile range of the resampled differences.

Segment statistics: BLEU and chrF — sacreBLEU's sufficient statistics (n-gram matches, lengths), summed over the
resampled segments and turned into a corpus score, exactly as sacreBLEU does; ROUGE-1/2/L — each segment's F1
(rouge-score), averaged; test loss — each segment's summed target-token loss and token count, token-weighted as
the reported loss is; IFEval — each prompt's strict/loose verdict (prompt level), or its instructions followed
and given (instruction level).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neft_lab.evaluation import metrics as task_metrics

Rows = Sequence[
    dict[str, Any]
]  # predictions.jsonl: source, reference, prediction (and loss_sum, loss_tokens)


@dataclass(frozen=True)
class SegmentMetric:
    """A metric as per-segment statistics (summed over a resample) and the score of summed statistics."""

    name: str
    higher_is_better: bool
    stats: Callable[[Rows], np.ndarray]  # (segments, k)
    score: Callable[[np.ndarray], float]  # (k,) summed statistics → the corpus score


def _sacrebleu(name: str, make: Callable[[], Any]) -> SegmentMetric:
    metric = make()

    def stats(rows: Rows) -> np.ndarray:
        hyps = [str(r["prediction"]) for r in rows]
        refs = [[str(r["reference"]) for r in rows]]
        return np.asarray(metric._extract_corpus_statistics(hyps, refs), dtype=np.float64)

    def score(summed: np.ndarray) -> float:
        return float(metric._compute_score_from_stats(summed.tolist()).score)

    return SegmentMetric(name, True, stats, score)


def _rouge(kind: str, target_lang: str) -> SegmentMetric:
    def stats(rows: Rows) -> np.ndarray:
        values = task_metrics.rouge_segments(
            [str(r["prediction"]) for r in rows], [str(r["reference"]) for r in rows], target_lang
        )[kind]
        return np.column_stack([values, np.ones(len(values))])

    return SegmentMetric(kind, True, stats, lambda s: float(s[0] / max(s[1], 1.0)))


def _loss(rows: Rows) -> np.ndarray:
    return np.asarray([[float(r["loss_sum"]), float(r["loss_tokens"])] for r in rows], dtype=np.float64)


LOSS = SegmentMetric("loss", False, _loss, lambda s: float(s[0] / max(s[1], 1.0)))


# IFEval (neft_lab.evaluation.ifeval): prompt-level accuracy is the mean of each prompt's verdict, instruction-level
# the share of all instructions followed, both x100; a resample draws prompts
IFEVAL_FIELDS = {
    "ifeval_prompt_strict": "ifeval_strict",
    "ifeval_prompt_loose": "ifeval_loose",
    "ifeval_inst_strict": "ifeval_inst_strict",
    "ifeval_inst_loose": "ifeval_inst_loose",
}


def _ifeval(name: str) -> SegmentMetric:
    field = IFEVAL_FIELDS[name]

    def stats(rows: Rows) -> np.ndarray:
        if name.startswith("ifeval_prompt"):
            return np.asarray([[float(bool(r[field])), 1.0] for r in rows])
        return np.asarray([[float(sum(map(bool, r[field]))), float(len(r[field]))] for r in rows])

    return SegmentMetric(name, True, stats, lambda s: float(100.0 * s[0] / max(s[1], 1.0)))


def segment_metric(name: str, target_lang: str = "en", bleu_lowercase: bool = False) -> SegmentMetric:
    """The segment-level form of a report metric: bleu, chrf, rouge1, rouge2, rougeL or loss."""
    if name == "bleu":
        return _sacrebleu(name, lambda: task_metrics.bleu_metric(target_lang, bleu_lowercase))
    if name == "chrf":
        return _sacrebleu(name, task_metrics.chrf_metric)
    if name in task_metrics.ROUGE_KINDS:
        return _rouge(name, target_lang)
    if name == "loss":
        return LOSS
    if name in IFEVAL_FIELDS:
        return _ifeval(name)
    raise ValueError(f"no segment-level statistics for metric {name!r}")


def has_statistics(name: str, rows: Rows) -> bool:
    """Whether `rows` carry what `name` needs (runs from before per-segment losses were saved have no loss)."""
    if not rows:
        return False
    if name == "loss":
        needed: tuple[str, ...] = ("loss_sum", "loss_tokens")
    elif name in IFEVAL_FIELDS:
        needed = (IFEVAL_FIELDS[name],)
    else:
        needed = ("prediction", "reference")
    return all(all(k in r for k in needed) for r in rows)


@dataclass(frozen=True)
class PairedResult:
    metric: str
    delta: float  # mean over seed pairs of (method − baseline) on the whole test set
    ci_low: float
    ci_high: float
    p_value: float
    pairs: int  # seed pairs
    segments: int
    samples: int

    def significant(self, alpha: float) -> bool:
        return self.p_value < alpha


def bootstrap_seed() -> int | None:
    """sacreBLEU's resampling seed (12345 unless SACREBLEU_SEED says otherwise; 'none' draws from the OS)."""
    seed = os.environ.get("SACREBLEU_SEED", "12345")
    return None if seed.lower() == "none" else int(seed)


def paired_bootstrap(
    metric: SegmentMetric,
    baseline_runs: Sequence[Rows],
    method_runs: Sequence[Rows],
    samples: int = 1000,
) -> PairedResult:
    """Paired bootstrap of `method_runs[i]` against `baseline_runs[i]` (seed pairs) over their shared segments."""
    from sacrebleu.significance import _compute_p_value

    if len(baseline_runs) != len(method_runs) or not baseline_runs:
        raise ValueError("paired_bootstrap needs one baseline run per method run (seed i with seed i)")
    n = len(baseline_runs[0])
    if any(len(rows) != n for rows in (*baseline_runs, *method_runs)) or n == 0:
        raise ValueError("paired runs must score the same (non-empty) test set")
    rng = np.random.default_rng(bootstrap_seed())
    idxs = rng.choice(n, size=(samples, n), replace=True)  # sacreBLEU's draw: the same segments for all runs
    observed = 0.0
    resampled = np.zeros(samples)
    for base_rows, method_rows in zip(baseline_runs, method_runs):
        for sign, rows in ((-1.0, base_rows), (1.0, method_rows)):
            stats = metric.stats(rows)
            observed += sign * metric.score(stats.sum(0))
            sums = stats[idxs].sum(1)  # (samples, k)
            resampled += sign * np.array([metric.score(s) for s in sums])
    pairs = len(baseline_runs)
    observed, resampled = observed / pairs, resampled / pairs
    if (
        np.all(resampled == 0.0) and observed == 0.0
    ):  # identical outputs: no difference to attribute to anything
        p = 1.0
    else:
        shifted = np.abs(resampled) - np.abs(resampled).mean()
        p = float(_compute_p_value(shifted, abs(observed)))
    low, high = np.percentile(resampled, [2.5, 97.5])
    return PairedResult(metric.name, float(observed), float(low), float(high), p, pairs, n, samples)


def same_test_set(runs: Sequence[Rows]) -> bool:
    """Whether every run scored the same segments in the same order (sources and references)."""
    first = [(r.get("source"), r.get("reference")) for r in runs[0]]
    return all([(r.get("source"), r.get("reference")) for r in rows] == first for rows in runs[1:])
