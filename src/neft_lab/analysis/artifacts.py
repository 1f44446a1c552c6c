"""The analysis folder on disk, so the stage, the plots and the notebook read the same files.

<out>/analysis.json                 settings, the models, one headline row per comparison (Figures 4/5)
<out>/utilization/<model>.safetensors  score, rank, kind_rank, best_layer per matrix; per-layer means
<out>/utilization/<model>.json      its summary (quantiles, per-layer mean score, top vectors)
<out>/compare/<run>.json            ΔRank vs the reference: categories, per-layer counts, buckets
<out>/compare/<run>.safetensors     per vector: delta_rank, rank_reference, rank_run, trained
<out>/overlap.json                  neuron sets: IoU / overlap matrices, per-layer distributions
<out>/figures/*.png                 the plots
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neft_lab.analysis.utilization import UtilizationTable
from neft_lab.errors import ConfigError
from neft_lab.io import apply_umask, atomic_write_json

INDEX = "analysis.json"


def slug(label: str) -> str:
    """A label as a file name: 'NeFT 3%' → 'NeFT_3pct'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("%", "pct")).strip("_") or "model"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    apply_umask(tmp)
    tmp.replace(path)
    return path


@dataclass
class Analysis:
    """A finished analysis folder, read back."""

    folder: Path
    index: dict[str, Any]

    @property
    def reference(self) -> str:
        return self.index["reference"]

    @property
    def runs(self) -> list[str]:
        """The compared runs' labels, in the order given."""
        return [c["label"] for c in self.index.get("comparisons", [])]

    @property
    def models(self) -> list[str]:
        return [m["label"] for m in self.index.get("models", [])]

    def table(self, label: str) -> UtilizationTable:
        return UtilizationTable.load(self.folder / "utilization" / f"{slug(label)}.safetensors")

    def comparison(self, label: str) -> dict[str, Any]:
        return json.loads((self.folder / "compare" / f"{slug(label)}.json").read_text())

    def comparison_arrays(self, label: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / "compare" / f"{slug(label)}.safetensors"))

    def overlap(self) -> dict[str, Any] | None:
        file = self.folder / "overlap.json"
        return json.loads(file.read_text()) if file.exists() else None


def load_analysis(folder: str | Path) -> Analysis:
    folder = Path(folder).expanduser()
    try:
        return Analysis(folder, json.loads((folder / INDEX).read_text()))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder} holds no readable {INDEX} ({err}): run stage=analyze first") from None


def find_analysis(root: str | Path) -> Path:
    """The newest analysis folder under `root` (one holding analysis.json): stage=analyze writes it to
    `<first run>/analysis` (or `analysis.out`), wherever the runs are under outputs/."""
    root = Path(root).expanduser()
    found = sorted(root.rglob(INDEX), key=lambda f: f.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise ConfigError(
            f"no analysis under {root}: run python -m neft_lab stage=analyze 'analysis.runs=[<run>,...]' (it writes "
            "<first run>/analysis), or set NEFT_LAB_ANALYSIS=<that folder>"
        )
    return found[-1].parent


def write_index(folder: Path, index: dict[str, Any]) -> Path:
    return atomic_write_json(folder / INDEX, index)
