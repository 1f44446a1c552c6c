"""Which kinds of MLP vectors (up rows, down columns, …) each method's neuron sets hold, from the runs'
`neuron_set.json` summaries: a pooled ranking can fill a whole kind first, which changes what a comparison
between selections tests (at 9% of Gemma-3-270M, NeFT's set is nearly all down vectors).

    python benchmarks/neuron_set_kinds.py benchmarks/results/table_small_cpu/final      # prints a markdown table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def kind_counts(summary: dict) -> dict[str, tuple[int, int]]:
    """Per kind: (vectors selected, vectors in the model), from a neuron set's JSON summary."""
    totals: dict[str, int] = {}
    for group, shape in summary["signature"].items():
        kind = group.split(".")[0]
        totals[kind] = totals.get(kind, 0) + int(shape[0])
    return {
        kind: (sum(summary["per_layer"].get(kind, {}).values()), totals[kind]) for kind in summary["kinds"]
    }


def kinds_table(final_dir: Path) -> str:
    by_method: dict[str, list[dict[str, tuple[int, int]]]] = {}
    for path in sorted(final_dir.glob("*/*/neuron_set.json")):
        by_method.setdefault(path.parent.parent.name, []).append(kind_counts(json.loads(path.read_text())))
    if not by_method:
        raise SystemExit(f"no */*/neuron_set.json under {final_dir}: pass a table's final/ folder")
    kinds = sorted({kind for runs in by_method.values() for run in runs for kind in run})
    lines = [
        "| method | sets | "
        + " | ".join(f"{kind} vectors selected (share of all {kind})" for kind in kinds)
        + " |",
        "|---|---:|" + "---:|" * len(kinds),
    ]
    for method, runs in by_method.items():
        cells = []
        for kind in kinds:
            chosen = [run[kind][0] for run in runs if kind in run]
            total = max(run[kind][1] for run in runs if kind in run)
            low, high = min(chosen), max(chosen)
            span = f"{low:,}" if low == high else f"{low:,}–{high:,}"
            shares = sorted({f"{100 * count / total:.0f}" for count in (low, high)}, key=float)
            cells.append(f"{span} of {total:,} ({'–'.join(shares)}%)")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "final_dir", type=Path, help="a table's final/ folder (<method>/<run>/neuron_set.json)"
    )
    print(kinds_table(parser.parse_args().final_dir))


if __name__ == "__main__":
    main()
