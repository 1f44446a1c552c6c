"""What the analysis needs from a run folder: is it one, its label, its model, and which vectors it trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from neft_lab.errors import ConfigError
from neft_lab.neurons import reference_weights
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet

NEURON_SET = "neuron_set.safetensors"
RESULTS = ("export", "neft_delta.safetensors")  # what stage=fit leaves that holds the trained weights
IDENTITY = ("name", "source", "name_or_path", "revision", "tiny")  # model keys that say which base it is


@dataclass
class Run:
    folder: Path
    config: DictConfig  # the run's own resolved config.yaml
    label: str = ""

    @property
    def strategy(self) -> str:
        return str(OmegaConf.select(self.config, "strategy.name", default="?"))

    @property
    def neuron_set_file(self) -> Path | None:
        file = self.folder / NEURON_SET
        return file if file.exists() else None

    def model_identity(self) -> dict[str, Any]:
        model = OmegaConf.to_container(self.config.model, resolve=False)
        return {k: model.get(k) for k in IDENTITY if model.get(k) is not None}


def read_run(path: str | Path, key: str = "analysis.runs") -> Run:
    """A finished training run folder, checked without loading anything big."""
    folder = Path(str(path)).expanduser()
    if not folder.exists():
        raise ConfigError(f"{key}: run folder {folder} does not exist")
    if not folder.is_dir() or not (folder / "config.yaml").exists():
        raise ConfigError(
            f"{key}: {folder} is not a run folder (no config.yaml): give the folder stage=fit wrote, "
            "e.g. outputs/runs/<task>/<strategy>/<time>"
        )
    if not any((folder / name).exists() for name in RESULTS):
        raise ConfigError(
            f"{key}: {folder} holds no trained result ({' or '.join(RESULTS)}): did the run finish with "
            "export.enabled=true?"
        )
    if reference_weights.is_compact(folder / "export") and not (folder / "neft_delta.safetensors").exists():
        raise ConfigError(f"{key}: {reference_weights.not_a_model(folder)}")
    return Run(folder, OmegaConf.load(folder / "config.yaml"))


def method_label(run: Run) -> str:
    """The report's name for the run's method ("NeFT 3%", "Full", "Random 3%", "LoRA r=8")."""
    from neft_lab.report import method_of
    from neft_lab.results import collect_runs

    rows = [r for r in collect_runs(run.folder) if Path(r["run_dir"]) == run.folder]
    return method_of(rows[0]).label if rows else run.strategy


def assign_labels(runs: list[Run], given: list[str] | None) -> None:
    """`analysis.labels`, or each run's method label made unique (NeFT 3%, NeFT 3% (2), ...)."""
    if given:
        if len(given) != len(runs):
            raise ConfigError(
                f"analysis.labels has {len(given)} names for {len(runs)} runs: give one per run"
            )
        names = [str(g) for g in given]
    else:
        names = [method_label(r) for r in runs]
    seen: dict[str, int] = {}
    for run, name in zip(runs, names):
        seen[name] = seen.get(name, 0) + 1
        run.label = name if seen[name] == 1 else f"{name} ({seen[name]})"
    if len({r.label for r in runs}) < len(runs) or "base" in {r.label for r in runs}:
        raise ConfigError(f"analysis.labels must be distinct and not 'base', got {[r.label for r in runs]}")


def trained_mask(run: Run, space: NeuronSpace) -> torch.Tensor | None:
    """Which vectors of `space` the run trained (flat, the space's order); None when it cannot be told."""
    strategy = OmegaConf.to_container(run.config.strategy, resolve=True)
    if run.neuron_set_file is not None:  # NeFT, random, reverse, from_file, union
        neuron_set = NeuronSet.load(run.neuron_set_file)
        masks = neuron_set.masks()
        return torch.cat([masks.get(g.name, torch.zeros(g.count, dtype=torch.bool)) for g in space.groups])
    if strategy.get("name") == "full":
        return torch.ones(space.num_vectors, dtype=torch.bool)
    if isinstance(strategy.get("train"), list):  # FT-embed, FT-{in,out}: whole matrices by kind
        return _by_group(space, lambda g: g.kind in strategy["train"])
    if strategy.get("name") == "lora":  # a low-rank update changes every vector of a targeted matrix
        targets = strategy.get("target_modules")
        if targets == "all-linear":
            return torch.ones(space.num_vectors, dtype=torch.bool)
        if isinstance(targets, list):
            return _by_group(space, lambda g: g.module.rsplit(".", 1)[-1] in targets)
    return None


def _by_group(space: NeuronSpace, keep: Any) -> torch.Tensor:
    return torch.cat([torch.full((g.count,), bool(keep(g)), dtype=torch.bool) for g in space.groups])


def check_same_base(runs: list[Run], base: Run | None) -> None:
    """Every run was trained from one base model: ΔRank between models of different bases means nothing."""
    reference = base or runs[0]
    for run in runs:
        if run.model_identity() != reference.model_identity():
            raise ConfigError(
                f"analysis.runs: {run.folder} was trained from {run.model_identity()}, but "
                f"{reference.folder} from {reference.model_identity()}: compare runs of one base model"
            )


def run_config(cfg: DictConfig, run: Run) -> DictConfig:
    """`cfg` with the run's model and strategy (and task unless task= is given), as stage=eval does."""
    from neft_lab.saved_runs import with_run_config

    return with_run_config(cfg, run.folder)


def load_run_model(cfg: DictConfig, run: Run) -> tuple[torch.nn.Module, Any]:
    """The run's trained model as plain layers (a NeFT delta on its checked base, a merged LoRA)."""
    from neft_lab.saved_runs import as_plain_layers, load_saved_model

    model, tokenizer = load_saved_model(run_config(cfg, run), run.folder)
    return as_plain_layers(model), tokenizer


def load_base_model(cfg: DictConfig, run: Run) -> tuple[torch.nn.Module, Any]:
    """The base model `run` was trained from."""
    from neft_lab.models.loading import load_model

    return load_model(run_config(cfg, run).model)
