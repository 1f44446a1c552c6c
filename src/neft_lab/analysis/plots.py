"""The analysis plots, drawn from the files of an analysis folder (so the notebook draws the same ones).

Every function returns a matplotlib Figure (no pyplot state, safe in a server process); `draw_all` saves
them as PNGs with `neft_lab.io.atomic_savefig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neft_lab.analysis.artifacts import Analysis, slug
from neft_lab.io import atomic_savefig

CATEGORY_COLORS = {
    "strongly_affected": "C0",
    "suppressed": "C3",
    "promoted": "C2",
    "indirectly_affected": "C1",
}
CATEGORY_NAMES = {
    "strongly_affected": "strongly affected",
    "suppressed": "suppressed",
    "promoted": "promoted",
    "indirectly_affected": "indirectly affected",
}


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _thresholds(threshold: int | dict[str, int]) -> list[int]:
    """The distinct thresholds in ranks (one, or one per kind)."""
    return sorted(set(threshold.values())) if isinstance(threshold, dict) else [int(threshold)]


def rank_scatter(
    arrays: dict[str, torch.Tensor], label: str, reference: str, threshold: int | dict[str, int]
) -> Any:
    """Rank in the reference against rank in the run, one point per vector; trained vectors on top."""
    fig, (ax,) = _figure(5.5, 5.0)
    ref, run = arrays["rank_reference"].numpy(), arrays["rank_run"].numpy()
    trained = arrays["trained"].bool().numpy() if "trained" in arrays else None
    n = int(max(ref.max(), run.max()))  # the size of the ranking: all vectors, or the largest kind
    if trained is None:
        ax.scatter(ref, run, s=0.5, alpha=0.3, color="C0", rasterized=True, label="vectors")
    else:
        ax.scatter(
            ref[~trained], run[~trained], s=0.5, alpha=0.3, color="C7", rasterized=True, label="not trained"
        )
        ax.scatter(ref[trained], run[trained], s=0.5, alpha=0.3, color="C3", rasterized=True, label="trained")
    ax.plot([1, n], [1, n], color="black", linewidth=0.8)
    for t in _thresholds(threshold):
        for sign in (1, -1):
            ax.plot([1, n], [1 + sign * t, n + sign * t], "--", color="black", linewidth=0.6)
    ax.set_xlim(0, n)
    ax.set_ylim(0, n)
    ax.set_xlabel(f"Rank in {reference} (1 = highest utilization)")
    ax.set_ylabel(f"Rank in {label}")
    ax.set_title(f"{label} vs {reference}: Rank per vector (dashed: ±threshold)")
    ax.legend(markerscale=10, fontsize="small", loc="upper left")
    fig.tight_layout()
    return fig


def delta_hist(
    arrays: dict[str, torch.Tensor], label: str, reference: str, threshold: int | dict[str, int]
) -> Any:
    """Histogram of ΔRank, trained and untrained vectors apart, with the strongly-affected threshold."""
    fig, (ax,) = _figure(6.0, 4.0)
    delta = arrays["delta_rank"].numpy()
    n = len(delta)
    bins = 60
    if "trained" in arrays and 0 < int(arrays["trained"].sum()) < n:
        trained = arrays["trained"].bool().numpy()
        ax.hist([delta[~trained], delta[trained]], bins=bins, stacked=True, color=["C7", "C3"],
                label=["not trained", "trained"])  # fmt: skip
    else:
        ax.hist(delta, bins=bins, color="C0", label="all vectors")
    for t in _thresholds(threshold):
        for x in (-t, t):
            ax.axvline(x, linestyle="--", color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(f"ΔRank = rank in {label} − rank in {reference} (> 0: used less)")
    ax.set_ylabel("vectors (log)")
    shown = "/".join(f"{t:,}" for t in _thresholds(threshold))
    ax.set_title(f"ΔRank, {label} vs {reference} (dashed: ±{shown})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def categories_per_layer(summary: dict[str, Any], label: str) -> Any:
    """Per layer and kind: strongly affected, suppressed and indirectly affected vectors."""
    per = summary["per_category"]
    kinds = list(per["strongly_affected"]["per_layer"])
    fig, axes = _figure(5.0 * len(kinds), 3.6, len(kinds))
    shown = [c for c in ("strongly_affected", "suppressed", "indirectly_affected") if c in per]
    width = 0.8 / len(shown)
    for ax, kind in zip(axes, kinds):
        for i, category in enumerate(shown):
            values = per[category]["per_layer"][kind]
            xs = [layer + (i - (len(shown) - 1) / 2) * width for layer in range(len(values))]
            ax.bar(xs, values, width=width, color=CATEGORY_COLORS[category], label=CATEGORY_NAMES[category])
        ax.set_xlabel("layer")
        ax.set_ylabel("vectors")
        ax.set_title(f"{label}: {kind} vectors")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def buckets(summary: dict[str, Any], label: str, reference: str) -> Any:
    """Avg(ΔRank) per bucket of the reference's utilization (the paper's Figure 2): % of the kind's largest
    score (bucket_scale max_score, the authors') or percentile of the ranking (0 = top)."""
    rows = [r for r in summary["buckets"] if r["vectors"]]
    names = [f"{r['from_percent']:g}–{r['to_percent']:g}" for r in rows]
    fig, axes = _figure(11.0, 3.8, 2)
    signed = [r["mean_delta_rank"] for r in rows]
    axes[0].bar(names, signed, color=["C3" if v > 0 else "C2" for v in signed])
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set_ylabel("Avg(ΔRank) (> 0: used less)")
    axes[1].bar(names, [r["mean_abs_delta_rank"] for r in rows], color="C0")
    axes[1].set_ylabel("Avg(|ΔRank|)")
    scale = summary.get("bucket_scale", "percentile")
    for ax in axes:
        if scale == "max_score":
            ax.set_xlabel(f"score in {reference}, % of its kind's largest (100 = top)")
        else:
            ax.set_xlabel(f"percentile of the Pearson score in {reference} (0 = top)")
        ax.tick_params(axis="x", labelrotation=45, labelsize="small")
    fig.suptitle(f"{label} vs {reference}, by the reference's utilization")
    fig.tight_layout()
    return fig


def runs_delta_rank(summaries: dict[str, dict[str, Any]], reference: str) -> Any:
    """Mean |ΔRank| of each run against the reference, over all, trained and untrained vectors (Figure 4)."""
    fig, (ax,) = _figure(max(5.0, 1.6 * len(summaries) + 2), 4.0)
    parts = [("mean_abs_delta_rank", "all vectors", "C0"), ("mean_abs_delta_rank_trained", "trained", "C3"),
             ("mean_abs_delta_rank_untrained", "not trained", "C7")]  # fmt: skip
    width = 0.8 / len(parts)
    labels = list(summaries)
    for i, (key, name, color) in enumerate(parts):
        values = [summaries[r].get(key) for r in labels]
        xs = [x + (i - 1) * width for x, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width=width, color=color, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("Avg(|ΔRank|)")
    ax.set_title(f"ΔRank against {reference}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def runs_categories(summaries: dict[str, dict[str, Any]], reference: str) -> Any:
    """Strongly affected, suppressed and indirectly affected vectors per run (Figure 5)."""
    fig, (ax,) = _figure(max(5.0, 1.6 * len(summaries) + 2), 4.0)
    shown = ("strongly_affected", "suppressed", "indirectly_affected")
    width = 0.8 / len(shown)
    labels = list(summaries)
    for i, category in enumerate(shown):
        values = [summaries[r]["counts"].get(category) for r in labels]
        xs = [x + (i - 1) * width for x, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width=width, color=CATEGORY_COLORS[category],
               label=CATEGORY_NAMES[category])  # fmt: skip
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("vectors")
    ax.set_title(f"Neuron categories against {reference}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def utilization_per_layer(per_layer: dict[str, dict[str, list[float]]]) -> Any:
    """Mean utilization score per layer, one line per model, one panel per kind."""
    return _per_layer_lines(per_layer, "mean utilization score")


def overlap_heatmap(overlap: dict[str, Any]) -> Any:
    """IoU and |A∩B|/min(|A|,|B|) between the neuron sets."""
    labels = overlap["labels"]
    fig, axes = _figure(5.0 + 1.2 * len(labels), 2.0 + 0.5 * len(labels), 2)
    for ax, key, title in zip(axes, ("iou", "overlap"), ("IoU |A∩B|/|A∪B|", "|A∩B| / min(|A|,|B|)")):
        matrix = overlap[key]
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                        fontsize="small")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize="small")
        ax.set_yticks(range(len(labels)), labels, fontsize="small")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def sets_per_layer(per_set: dict[str, dict[str, Any]]) -> Any:
    """Share of each layer's vectors that each neuron set selects, one panel per kind."""
    shares = {label: dist["share"] for label, dist in per_set.items()}
    return _per_layer_lines(shares, "share of the layer's vectors selected")


def _per_layer_lines(series: dict[str, dict[str, list[float]]], ylabel: str) -> Any:
    """label → kind → one value per layer, drawn as one line per label in one panel per kind."""
    kinds = list(next(iter(series.values())))
    fig, axes = _figure(5.0 * len(kinds), 3.6, len(kinds))
    for ax, kind in zip(axes, kinds):
        for i, (label, table) in enumerate(series.items()):
            values = table.get(kind, [])
            ax.plot(range(len(values)), values, marker="o", markersize=3, color=f"C{i}", label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{kind} vectors")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def figures(analysis: Analysis) -> dict[str, Any]:
    """File name → Figure, for everything the analysis folder holds."""
    out: dict[str, Any] = {}
    reference = analysis.reference
    summaries = {}
    for label in analysis.runs:
        summary = analysis.comparison(label)
        arrays = analysis.comparison_arrays(label)
        threshold = summary["threshold_ranks"]
        summaries[label] = summary
        name = slug(label)
        out[f"rank_scatter_{name}.png"] = rank_scatter(arrays, label, reference, threshold)
        out[f"delta_rank_hist_{name}.png"] = delta_hist(arrays, label, reference, threshold)
        out[f"categories_per_layer_{name}.png"] = categories_per_layer(summary, label)
        out[f"buckets_{name}.png"] = buckets(summary, label, reference)
    if summaries:
        out["runs_delta_rank.png"] = runs_delta_rank(summaries, reference)
        out["runs_categories.png"] = runs_categories(summaries, reference)
    if analysis.models:
        out["utilization_per_layer.png"] = utilization_per_layer(
            {m["label"]: m["per_layer_mean_score"] for m in analysis.index["models"]}
        )
    overlap = analysis.overlap()
    if overlap and len(overlap["labels"]) >= 2:
        out["overlap.png"] = overlap_heatmap(overlap)
    if overlap and overlap.get("per_layer"):
        out["sets_per_layer.png"] = sets_per_layer(overlap["per_layer"])
    return out


def draw_all(analysis: Analysis, into: str | Path | None = None) -> list[Path]:
    """Save every figure as `<into>/<name>.png` (default: `<analysis folder>/figures`)."""
    into = Path(into) if into is not None else analysis.folder / "figures"
    paths = []
    for name, fig in figures(analysis).items():
        paths.append(atomic_savefig(fig, into / name))
    return paths
