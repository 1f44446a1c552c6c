"""Every value of every sweep axis composes into a runnable config, and the W&B sweeps match their grids."""

from __future__ import annotations

import itertools

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from neft_lab.config import conf_dir, register_resolvers
from neft_lab.neurons.selection import budget_share
from neft_lab.strategies import build_strategy

# grid sweeps (Hydra's basic sweeper); lr_search.yaml is Optuna's search space (tests/test_launchers.py)
SWEEPS = sorted(p for p in (REPO / "sweeps").glob("*.yaml") if "override hydra/sweeper" not in p.read_text())
EXTRA = {"transfer_union": ["+sets.own=own.safetensors", "+sets.other=other.safetensors"]}


def _axes(path):
    params = OmegaConf.load(path).hydra.sweeper.params
    return [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]


def _jobs(path):
    return [list(job) for job in itertools.product(*_axes(path))]


def _covering_jobs(path):
    """Few jobs in which every value of every axis appears (composing all 60+ would take a minute)."""
    axes = _axes(path)
    return [[axis[i % len(axis)] for axis in axes] for i in range(max(map(len, axes)))]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_value_of_the_sweep_composes(path):
    register_resolvers()
    jobs = _covering_jobs(path)
    assert len(_jobs(path)) >= 2
    with initialize_config_dir(version_base="1.3", config_dir=str(path.parent)):
        for job in jobs:
            cfg = compose(
                config_name=path.stem,
                overrides=job
                + EXTRA.get(path.stem, [])
                + [f"hydra.searchpath=[file://{conf_dir()}]", "paths.run_dir=/tmp/x"],
            )
            resolved = OmegaConf.to_container(cfg, resolve=True)
            strategy = build_strategy(cfg.strategy)
            if strategy.name in ("neft", "random_neuron", "reverse_selection"):
                assert resolved["selection"]["name"] != "none"
                if "budget=" in " ".join(job):
                    assert resolved["selection"]["budget"]["value"] == budget_share(
                        job[[j.split("=")[0] for j in job].index("budget")].split("=")[1]
                    )
            if strategy.name == "lora" and path.stem == "budget_lora":
                assert strategy.r == "match"


def test_budget_grid_is_the_papers():
    jobs = _jobs(REPO / "sweeps" / "budget_neft.yaml")
    budgets = sorted(
        {j.split("=")[1] for job in jobs for j in job if j.startswith("budget=")}, key=budget_share
    )
    assert budgets == ["paper_0.4", "paper_1.5", "paper_3", "paper_6", "paper_9", "paper_12"]  # Table 7
    assert len(jobs) == 3 * 6 * 2


@pytest.mark.parametrize("name", ["budget_neft", "budget_lora", "selection_ablation"])
def test_wandb_sweep_matches_the_hydra_grid(name):
    wandb_sweep = yaml.safe_load((REPO / "sweeps" / "wandb" / f"{name}.yaml").read_text())
    assert (
        wandb_sweep["command"][2:4] == ["-m", "neft_lab"] and "${args_no_hyphens}" in wandb_sweep["command"]
    )
    hydra_params = OmegaConf.load(REPO / "sweeps" / f"{name}.yaml").hydra.sweeper.params
    for key, values in hydra_params.items():
        grid = wandb_sweep["parameters"][key]["values"]
        assert [str(v) for v in grid] == str(values).split(","), key


def test_lora_rank_matches_the_budget():
    from neft_lab.models.loading import parameter_count
    from neft_lab.models.tiny import build_tiny_model
    from neft_lab.neurons.selection import lora_parameter_count
    from neft_lab.strategies.lora import matched_rank

    model, _ = build_tiny_model("llama", hidden_size=128, intermediate_size=512)
    for share in (0.015, 0.09):
        rank = matched_rank(model, share)
        best = min(
            range(1, 200), key=lambda r: abs(lora_parameter_count(model, r) - share * parameter_count(model))
        )
        assert rank == best


def test_lora_match_trains_with_the_matched_rank(tiny_overrides, tmp_path):
    from conftest import read_metrics
    from neft_lab.config import compose
    from neft_lab.pipeline import run

    run(
        compose(
            tiny_overrides
            + [
                "strategy=lora",
                "strategy.r=match",
                "budget=0.09",
                "trainer.max_steps=2",
                "trainer.val_check_interval=1",
                "eval.before=false",
                "task.data.embedded.n_test=4",
            ]
        )
    )
    metrics = read_metrics(tmp_path / "run")
    assert isinstance(metrics["lora_r"], int) and metrics["lora_r"] > 1
    assert (
        abs(metrics["trainable_percent"] - 9.0) < 2.0
    )  # within one rank step of the budget on the tiny model
