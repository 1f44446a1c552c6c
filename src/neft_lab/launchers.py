"""Hydra's launcher and sweeper plugins that fan a sweep out (the `sweeps` extra), and what our jobs need from them.

- `hydra/launcher=slurm` / `local` (hydra-submitit-launcher), `hydra/launcher=parallel` (hydra-joblib-
  launcher) and `hydra/sweeper=optuna` (hydra-optuna-sweeper, `sweeps/lr_search.yaml`) come from optional
  packages. Without them Hydra fails with "Could not find 'hydra/launcher/submitit_slurm'"; `missing_plugin_error`
  (called by the CLI before Hydra starts) names the extra to install instead.
- `SubmititRanks` (a Hydra callback): a job of submitit's local executor with several tasks gets the
  torch.distributed variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) so that its tasks are the
  ranks of one DDP run, as a SLURM job's tasks are for Lightning's SLURMEnvironment.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

logger = logging.getLogger(__name__)

EXTRA = "sweeps"
INSTALL = f"pip install 'neft_lab[{EXTRA}]'"
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "submitit", "hydra-submitit-launcher")
_JOBLIB = ("hydra_plugins.hydra_joblib_launcher", "joblib", "hydra-joblib-launcher")
_OPTUNA = ("hydra_plugins.hydra_optuna_sweeper", "optuna", "hydra-optuna-sweeper")
# (config group, option) → (plugin module, the engine it drives, the package that provides both)
PLUGINS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("hydra/launcher", "slurm"): _SUBMITIT,
    ("hydra/launcher", "submitit_slurm"): _SUBMITIT,
    ("hydra/launcher", "local"): _SUBMITIT,
    ("hydra/launcher", "submitit_local"): _SUBMITIT,
    ("hydra/launcher", "parallel"): _JOBLIB,
    ("hydra/launcher", "joblib"): _JOBLIB,
    ("hydra/sweeper", "optuna"): _OPTUNA,
}


def importable(module: str) -> bool:
    """Whether `module` imports (plugin packages are light; a module set to None in sys.modules counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _choices_in_file(path: Path) -> list[tuple[str, str]]:
    """`override hydra/launcher: x` entries of a primary config's defaults list (a sweep file)."""
    from omegaconf import OmegaConf

    try:
        defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    except Exception:  # unreadable: Hydra reports it
        return []
    found = []
    for entry in defaults:
        if isinstance(entry, dict):
            for key, value in entry.items():
                group = str(key).removeprefix("override").strip().lstrip("/")
                if group.startswith("hydra/") and isinstance(value, str):
                    found.append((group, value))
    return found


def selected_plugins(argv: list[str]) -> list[tuple[str, str]]:
    """The (group, option) of every launcher or sweeper a command line selects, directly or in its sweep file."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # a bad flag: Hydra reports it
        return []
    found = []
    for override in args.overrides:
        key, _, value = override.lstrip("+~").partition("=")
        key = key.removeprefix("override").strip().lstrip("/")
        if key in ("hydra/launcher", "hydra/sweeper"):
            found.append((key, value))
    if args.config_name:
        from neft_lab.config import conf_dir

        folder = Path(args.config_dir).expanduser() if args.config_dir else conf_dir()
        name = args.config_name if args.config_name.endswith(".yaml") else f"{args.config_name}.yaml"
        if (folder / name).is_file():
            found = _choices_in_file(folder / name) + found
    return found


def missing_plugin_error(argv: list[str]) -> str | None:
    """The one-line error for a launcher or sweeper whose plugin is not installed, naming the extra; else None."""
    for group, option in selected_plugins(argv):
        plugin = PLUGINS.get((group, option))
        if plugin is None:
            continue
        module, engine, package = plugin
        missing = [name for name in (module, engine) if not importable(name)]
        if missing:
            return (
                f"{group}={option} needs {package} ({', '.join(missing)} not importable): install the "
                f"'{EXTRA}' extra with `{INSTALL}` (or `pip install -e '.[{EXTRA}]'` in a checkout)"
            )
    return None


class SubmititRanks(Callback):
    """Give the tasks of a multi-task job of submitit's local executor the variables of one DDP run."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        export_local_ranks()


def export_local_ranks() -> dict[str, str] | None:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from submitit's local job environment, when this
    process is a task of a local job with more than one task (Lightning then joins them, as under torchrun).
    MASTER_PORT: the caller's, else one derived from the job id. SLURM jobs are left alone: Lightning reads SLURM_*."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or "SUBMITIT_LOCAL_GLOBALID" not in os.environ:
        return None
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks < 2:
        return None
    env = TorchDistributedEnvironment()
    env.master_addr = "127.0.0.1"  # one machine; its host name may not resolve to an interface gloo can bind
    env.export(set_cuda_visible_devices=False, overwrite=True)
    exported = {"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "MASTER_PORT": str(env.master_port)}
    logger.info("submitit local task: %s", " ".join(f"{k}={v}" for k, v in exported.items()))
    return exported
