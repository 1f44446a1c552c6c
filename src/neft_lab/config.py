"""Where the Hydra configs live, custom resolvers, and `compose` for tests and notebooks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """`conf/` of a source checkout, else the copy shipped inside the installed package."""
    packaged = Path(__file__).resolve().parent / "conf"
    checkout = Path(__file__).resolve().parents[2] / "conf"
    for candidate in (packaged, checkout):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"neft_lab configs not found in {packaged} or {checkout}: reinstall the package")


def wandb_offline() -> bool:
    """Offline unless W&B credentials exist and its server answers (compute nodes often lack internet)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    if not has_key:
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError:
        return True
    return False


def basename(path: str) -> str:
    """`meta-llama/Llama-2-7b-hf` → `Llama-2-7b-hf`: a model id usable in folder names and W&B tags."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def budget_share(value: object) -> float:
    """`${neft_lab.budget_share:${budget}}`: 0.09 stays 0.09, `paper_9` becomes the paper's 150,000-vector share."""
    from neft_lab.neurons.selection import budget_share as share

    return share(value)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("neft_lab.wandb_offline"):
        OmegaConf.register_new_resolver("neft_lab.wandb_offline", wandb_offline, use_cache=True)
    if not OmegaConf.has_resolver("neft_lab.basename"):
        OmegaConf.register_new_resolver("neft_lab.basename", basename)
    if not OmegaConf.has_resolver("neft_lab.command_dir"):  # hydra.run.dir, named after the stage
        from neft_lab.run_folder import command_dir

        OmegaConf.register_new_resolver("neft_lab.command_dir", command_dir)
    if not OmegaConf.has_resolver("neft_lab.budget_share"):
        OmegaConf.register_new_resolver("neft_lab.budget_share", budget_share)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config `python -m neft_lab <overrides>` would run, without starting a Hydra job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
