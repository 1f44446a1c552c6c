"""What a CPU table cost, per method, from its runs' own `metrics.json` (the committed copies are enough).

A long table runs over several sessions: runs are paused (SIGSTOP) while the test suite uses the machine, or
stopped and resumed. Their `wall_seconds` then count the pauses, so the sum of walls is an upper bound on the
table's cost, not its cost. This script gives both: the sum of walls, and an undisturbed estimate made from the
fastest run of each kind (grid trial, final run) that trained and evaluated in one attempt — a run whose
training seconds cover its steps at its median step time (an attempt that only evaluated a finished run is left
out of the estimate) — times the number of runs of that kind, plus the zero-shot evaluation.

    python benchmarks/table_cost.py benchmarks/results/table_small_cpu      # prints a markdown table
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from neft_lab.results import collect_runs


def trained_in_one_attempt(run: dict[str, Any]) -> bool:
    """True when the run's training seconds cover all its steps (a resumed, evaluation-only attempt does not)."""
    steps, seconds, median = (
        run.get("train_steps"),
        run.get("train_seconds"),
        run.get("train_step_seconds_median"),
    )
    return bool(steps and seconds and median) and seconds >= 0.9 * steps * median


def _by_method(root: Path) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in collect_runs(root) if root.is_dir() else []:
        method = Path(run["run_dir"]).relative_to(root).parts[0]
        groups.setdefault(method, []).append(run)
    return groups


def _fastest_minutes(runs: list[dict[str, Any]]) -> float | None:
    whole = [r["wall_seconds"] / 60 for r in runs if trained_in_one_attempt(r) and r.get("wall_seconds")]
    return min(whole) if whole else None


def cost_table(table_dir: Path) -> str:
    grids, finals = _by_method(table_dir / "search"), _by_method(table_dir / "final")
    lines = [
        "| method | grid trials | fastest trial, min | final runs | step s (median) | fastest final run, min "
        "| undisturbed estimate, min | sum of walls, min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total_estimate = total_walls = 0.0
    zero_shot_minutes = 0.0
    for method in sorted(set(grids) | set(finals), key=lambda m: (m != "full", m)):
        trials, runs = grids.get(method, []), finals.get(method, [])
        trial_min, final_min = _fastest_minutes(trials), _fastest_minutes(runs)
        steps = [r["train_step_seconds_median"] for r in runs if r.get("train_step_seconds_median")]
        estimate = len(trials) * (trial_min or 0.0) + len(runs) * (final_min or 0.0)
        walls = sum((r.get("wall_seconds") or 0.0) for r in trials + runs) / 60
        zero_shot_minutes += sum((r.get("before_seconds") or 0.0) for r in runs) / 60
        total_estimate += estimate
        total_walls += walls
        lines.append(
            f"| {method} | {len(trials)} | {_fmt(trial_min)} | {len(runs)} | "
            f"{_fmt(statistics.median(steps) if steps else None, 2)} | {_fmt(final_min)} | {estimate:.0f} | "
            f"{walls:.0f} |"
        )
    lines.append(
        f"| all (zero-shot evaluation {zero_shot_minutes:.0f} min included) | | | | | | "
        f"{total_estimate + zero_shot_minutes:.0f} ({(total_estimate + zero_shot_minutes) / 60:.1f} h) | "
        f"{total_walls:.0f} ({total_walls / 60:.1f} h) |"
    )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table_dir", type=Path, help="the table's folder, holding search/ and final/")
    args = parser.parse_args()
    if not (args.table_dir / "final").is_dir() and not (args.table_dir / "search").is_dir():
        raise SystemExit(f"{args.table_dir} has no search/ or final/ folder: pass the table's output folder")
    print(cost_table(args.table_dir))


if __name__ == "__main__":
    main()
