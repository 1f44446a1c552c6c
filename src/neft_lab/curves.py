"""Convergence curves (the paper's Figures 6/7): validation loss against step, one line per method.

Each run's validation losses come from its own log: `<run>/csv/metrics.csv` (logger=csv, the `val/loss` column
against `step`) or, failing that, its offline W&B run (`<run>/wandb/offline-run-*`, `val/loss` against
`trainer/global_step`); Lightning logs in-loop metrics at (optimizer steps taken − 1), so a validation after
step 20 is logged at 19 and drawn at 20. A method's line is the mean over its runs (seeds) at each step they logged; the band is
their min–max. Runs of different lengths (early stopping) count where they have a value.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VAL_KEY = "val/loss"


def validation_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, validation loss) of one run in step order (the last value when a step was logged twice,
    as after a resume); [] when the run logged none."""
    run_dir = Path(run_dir)
    points = _from_csv(run_dir / "csv" / "metrics.csv") or _from_wandb(run_dir)
    by_step = {step: value for step, value in points if math.isfinite(value)}
    return sorted(by_step.items())


def logged_step_seconds(run_dir: str | Path) -> float | None:
    """The median of a run's logged `train/step_seconds` (one value per step, the last after a resume): the step
    time of a run whose metrics.json lacks it (a run resumed under an older neft_lab recorded only its last
    attempt's); None without a CSV log."""
    values = logged_step_times(run_dir)
    return statistics.median(values) if values else None


def logged_step_times(run_dir: str | Path) -> list[float]:
    """A run's logged `train/step_seconds`, one per step in step order (the last attempt's after a resume)."""
    by_step = dict(_from_csv(Path(run_dir) / "csv" / "metrics.csv", "train/step_seconds"))
    return [by_step[step] for step in sorted(by_step) if math.isfinite(by_step[step])]


def _from_csv(path: Path, key: str = VAL_KEY) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    out = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            value, step = row.get(key), row.get("step")
            if value and step:
                try:
                    out.append((int(float(step)) + 1, float(value)))
                except ValueError:
                    continue
    return out


def _from_wandb(run_dir: Path) -> list[tuple[int, float]]:
    from neft_lab.wandb_offline import find_offline_runs, read_offline_run

    out = []
    for folder in find_offline_runs(run_dir / "wandb") if (run_dir / "wandb").is_dir() else []:
        try:
            run = read_offline_run(folder)
        except (OSError, ValueError):
            continue
        for row in run.history:
            if VAL_KEY in row and "trainer/global_step" in row:
                out.append((int(row["trainer/global_step"]) + 1, float(row[VAL_KEY])))
    return out


def method_curve(run_dirs: Sequence[str | Path]) -> list[tuple[int, float, float, float, int]]:
    """(step, mean, min, max, runs) over the runs' validation losses at each step any of them logged."""
    at: dict[int, list[float]] = defaultdict(list)
    for run_dir in run_dirs:
        for step, value in validation_curve(run_dir):
            at[step].append(value)
    return [(s, sum(v) / len(v), min(v), max(v), len(v)) for s, v in sorted(at.items())]


def curves_figure(panels: dict[str, dict[str, Sequence[str | Path]]]) -> Any:
    """One panel per task; in each, one line per method (mean over its runs) with a min–max band. Methods
    without a logged validation loss are left out (and named in the log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(7 * max(len(panels), 1), 4.5), squeeze=False)
    for ax, (task, methods) in zip(axes[0], panels.items()):
        drawn = 0
        for label, run_dirs in methods.items():
            curve = method_curve(run_dirs)
            if not curve:
                logger.warning("curves: no validation loss logged by the runs of %s on %s", label, task)
                continue
            steps = [c[0] for c in curve]
            (line,) = ax.plot(
                steps, [c[1] for c in curve], marker="o", markersize=3, label=f"{label} (n={len(run_dirs)})"
            )
            ax.fill_between(
                steps, [c[2] for c in curve], [c[3] for c in curve], color=line.get_color(), alpha=0.15
            )
            drawn += 1
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{task}: validation loss (mean over seeds, band: min–max)", fontsize=10)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
