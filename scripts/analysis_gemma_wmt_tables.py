"""The tables of docs/analysis_gemma_wmt.md, from the JSON summaries scripts/analysis_gemma_wmt.sh copies into
docs/figures/analysis_gemma_wmt/seed<S>/ (authors' threshold) and seed<S>/threshold_1pct/ (1% of a kind):

    python scripts/analysis_gemma_wmt_tables.py [docs/figures/analysis_gemma_wmt]

Every cell is "mean over seeds (seed values)", so a reader sees the spread of two seeds, not only the mean."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RUNS = ("NeFT_3pct", "Random_3pct", "Full")
LABELS = {"NeFT_3pct": "NeFT 3%", "Random_3pct": "Random 3%", "Full": "Full"}
KINDS = ("up", "down")


def cell(values: list[float | None], digits: int = 0, percent: bool = False) -> str:
    """`mean (a / b)` over the seeds; `–` where a value does not exist (a kind with no trained vector)."""
    shown = [v for v in values if v is not None]
    if not shown:
        return "–"
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else ""

    def fmt(v: float) -> str:
        return f"{v * scale:,.{digits}f}{unit}"

    mean = fmt(statistics.fmean(shown))
    return mean if len(shown) == 1 else f"{mean} ({' / '.join(fmt(v) for v in shown)})"


def load(root: Path, threshold: str) -> dict[str, list[dict]]:
    """Run → its compare summary of every seed, in seed order."""
    seeds = sorted(p for p in root.glob("seed*") if p.is_dir())
    folder = (lambda s: s) if threshold == "authors" else (lambda s: s / "threshold_1pct")
    return {run: [json.loads((folder(s) / f"compare_{run}.json").read_text()) for s in seeds] for run in RUNS}


def movement_table(data: dict[str, list[dict]]) -> list[str]:
    rows = ["| base vs | Avg ΔRank (mean over kinds) | mean \\|ΔRank\\| up | mean \\|ΔRank\\| down | Spearman up | "
            "Spearman down | strongly affected up | strongly affected down | suppressed | promoted | "
            "indirectly affected |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run, seeds in data.items():
        strong = [s["per_category"]["strongly_affected"]["per_kind"] for s in seeds]
        rows.append(
            f"| {LABELS[run]} | {cell([s['avg_delta_rank'] for s in seeds])} | "
            + " | ".join(cell([s["mean_abs_delta_rank_per_kind"][k] for s in seeds]) for k in KINDS)
            + " | "
            + " | ".join(cell([s["spearman_per_kind"][k] for s in seeds], 4) for k in KINDS)
            + " | "
            + " | ".join(cell([c.get(k, 0) for c in strong]) for k in KINDS)
            + " | "
            + " | ".join(
                cell([s["counts"][c] for s in seeds])
                for c in ("suppressed", "promoted", "indirectly_affected")
            )
            + " |"
        )
    return rows


def trained_table(data: dict[str, list[dict]]) -> list[str]:
    rows = ["| run | kind | trained vectors | mean \\|ΔRank\\| trained | untrained | strongly affected: trained | "
            "untrained |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in ("NeFT_3pct", "Random_3pct"):
        for kind in KINDS:
            parts = [s["trained_per_kind"][kind] for s in data[run]]
            rows.append(
                f"| {LABELS[run]} | {kind} | {cell([p['trained_vectors'] for p in parts])} | "
                f"{cell([p['mean_abs_delta_rank_trained'] for p in parts])} | "
                f"{cell([p['mean_abs_delta_rank_untrained'] for p in parts])} | "
                f"{cell([p['share_of_trained_strongly_affected'] for p in parts], 1, True)} | "
                f"{cell([p['share_of_untrained_strongly_affected'] for p in parts], 1, True)} |"
            )
    return rows


def main(root: Path) -> None:
    for threshold, title in (("authors", "the authors' threshold, 28.4% of a kind's ranking"),
                             ("1pct", "1% of a kind's ranking")):  # fmt: skip
        data = load(root, threshold)
        ranks = data["NeFT_3pct"][0]["threshold_ranks"]
        print(f"\n### Movement, {title} ({ranks} ranks)\n")
        print("\n".join(movement_table(data)))
        print(f"\n### Trained vs untrained vectors within each kind, {title}\n")
        print("\n".join(trained_table(data)))
    overlaps = [
        json.loads((s / "overlap.json").read_text()) for s in sorted(root.glob("seed*")) if s.is_dir()
    ]
    print(
        "\nNeFT vs random sets: IoU",
        cell([o["iou"][0][1] for o in overlaps], 3),
        "| |A∩B| / min",
        cell([o["overlap"][0][1] for o in overlaps], 3),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/figures/analysis_gemma_wmt"))
