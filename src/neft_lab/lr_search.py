"""Tuned learning rates for fair comparisons: what a job returns to a sweeper, and the best value of a search.

Each method gets its own Optuna study over `optim.lr` (log-uniform) on the validation loss
(`sweeps/lr_search.yaml`, `sweep_objective=val_loss`), then its final seeds run at the best value:

    python -m neft_lab -m --config-dir sweeps --config-name lr_search strategy=lora hydra.sweep.dir=outputs/lr/lora
    python -m neft_lab -m strategy=lora seed=0,1,2 $(python -m neft_lab.lr_search outputs/lr/lora) \\
        hydra.sweep.dir=outputs/final/lora
    python -m neft_lab stage=report report.dir=outputs/final      # the lr column names each method's lr

`scripts/lr_search.sh` does this for every method. The search's trials stay in `<search dir>/<trial>/` and
the sweeper writes `<search dir>/optimization_results.yaml` (best_params, best_value), which is what
`python -m neft_lab.lr_search <search dir>` reads.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from neft_lab.errors import ConfigError

logger = logging.getLogger(__name__)

# the main test metric (higher is better) | the best validation loss (lower is better)
OBJECTIVES = ("test", "val_loss")
RESULTS = "optimization_results.yaml"


def check_objective(cfg: DictConfig) -> str:
    value = str(OmegaConf.select(cfg, "sweep_objective", default="test") or "test")
    if value not in OBJECTIVES:
        raise ConfigError(f"sweep_objective={value}: choose one of {', '.join(OBJECTIVES)}")
    return value


def objective(cfg: DictConfig, result: float | None) -> float | None:
    """What the run returns (to a Hydra sweeper): `result` (the main test metric) for `sweep_objective=test`,
    the run's best validation loss from its metrics.json for `val_loss` (the worst value when it has none)."""
    if check_objective(cfg) == "test" or OmegaConf.select(cfg, "stage") != "fit":
        return result
    from neft_lab.stages import nested_run

    if nested_run():  # the NeFT reference run: its caller ignores what it returns
        return result
    from neft_lab.run_folder import finished_metrics

    run_dir = Path(str(OmegaConf.select(cfg, "paths.run_dir")))
    loss = ((finished_metrics(run_dir) or {}).get("train") or {}).get("best_val_loss")
    if loss is None or not math.isfinite(float(loss)):
        logger.warning(
            "sweep_objective=val_loss: %s records no validation loss (is validation on? trainer.val_check_interval)",
            run_dir,
        )
        from neft_lab.sweep_summary import worst_value

        return worst_value()
    return float(loss)


class GridOrder(Callback):
    """Optuna's grid sampler (`hydra/sweeper/sampler: grid`) picks the next grid point with Python's global
    `random`. Seeded when the sweep starts, and shielded from the jobs (which reseed it, or not when a finished
    job is skipped: Hydra's basic launcher runs them in the sweeper's process), trial n is the same learning
    rate in every rerun, so a rerun finds trial n's finished folder and skips it."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._state: object | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        random.seed(self.seed)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._state = random.getstate()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._state is not None:
            random.setstate(self._state)


def best_params(search_dir: str | Path) -> dict[str, Any]:
    """`best_params` of an Optuna sweep (its `optimization_results.yaml`)."""
    file = Path(search_dir).expanduser() / RESULTS
    if not file.is_file():
        raise ConfigError(
            f"{file} does not exist: is {search_dir} the hydra.sweep.dir of a finished Optuna sweep?"
        )
    results = OmegaConf.to_container(OmegaConf.load(file))
    params = results.get("best_params") if isinstance(results, dict) else None
    if not params:
        raise ConfigError(f"{file} has no best_params (a multi-objective study?)")
    value = results.get("best_value")
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ConfigError(f"every trial of {search_dir} failed (best value {value}): see its sweep summary")
    return dict(params)


def best_overrides(search_dir: str | Path) -> list[str]:
    """The best values as command-line overrides, e.g. ['optim.lr=0.000312']."""
    return [f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in
            best_params(search_dir).items()]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m neft_lab.lr_search <search dir>`: print the best overrides on one line (for `$(...)`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m neft_lab.lr_search <hydra.sweep.dir of an Optuna sweep>", file=sys.stderr)
        return 2
    try:
        print(" ".join(best_overrides(args[0])))
    except ConfigError as err:
        print(f"neft_lab error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
