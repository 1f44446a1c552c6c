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
    """`${neft_lab.budget_share:${budget}}`: 0.09 stays 0.09, a paper point (`paper_9`) the share of its vector
    count (150,000) on Llama-2-7B (neurons.selection.PAPER_POINTS)."""
    from neft_lab.neurons.selection import budget_share as share

    return share(value)


# Epochs of the paper presets per method (`${neft_lab.paper_epochs:${strategy.name}}`). The paper trains every
# method "until convergence" and keeps the checkpoint of lowest validation loss (§5 Training Setup: usually
# in the first epoch, for summarization sometimes the second; "For training with LoRA, convergence was
# typically attained within 2 to 3 epochs"; Figures 6/7 put LoRA's convergence at 8,800-9,600 steps, beyond
# two epochs of 20k pairs at batch 6 = 6,667 steps). Every released command runs `--num_train_epochs 2`
# (train_neuron/train.sh; the LoRA script's one example is not a paper run). So: 2 for every method, LoRA 3.
PAPER_EPOCHS = {"lora": 3}
PAPER_EPOCHS_DEFAULT = 2


def paper_epochs(strategy: object) -> int:
    """`${neft_lab.paper_epochs:${strategy.name}}`: the epochs a paper preset trains `strategy` for."""
    return PAPER_EPOCHS.get(str(strategy), PAPER_EPOCHS_DEFAULT)


def language(code: object) -> str:
    """`${neft_lab.language:fr}` → French (task=translation's prompt); a code without a known name stays as it is."""
    from neft_lab.data.task import LANGUAGE_NAMES

    return LANGUAGE_NAMES.get(str(code), str(code))


def data_name(*folders: object) -> str:
    """`${neft_lab.data_name:${.data.data_dir},${.data.train_dir}}`: the name of the first folder given (its last
    part, `~/data/mynews/` → `mynews`), so task=summarization on one's own files names itself after them."""
    for folder in folders:
        if folder not in (None, "", "None"):
            return basename(str(folder)) or "data"
    return "data"


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
    if not OmegaConf.has_resolver("neft_lab.paper_epochs"):
        OmegaConf.register_new_resolver("neft_lab.paper_epochs", paper_epochs)
    if not OmegaConf.has_resolver("neft_lab.language"):
        OmegaConf.register_new_resolver("neft_lab.language", language)
    if not OmegaConf.has_resolver("neft_lab.data_name"):
        OmegaConf.register_new_resolver("neft_lab.data_name", data_name)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config `python -m neft_lab <overrides>` would run, without starting a Hydra job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def command_line_overrides() -> list[str]:
    """The overrides the user typed for this Hydra job (`model=tiny optim.lr=1e-4`); [] outside a Hydra job
    (tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job
        return []


def override_of(override: str, keys: tuple[str, ...]) -> bool:
    """Whether a command-line override (`+task.data.x=1`, `task=wmt`) sets one of `keys` or a key under it."""
    key = override.split("=", 1)[0].lstrip("+~").removesuffix("@_global_")
    return any(key == k or key.startswith(f"{k}.") for k in keys)


def overridden(group: str) -> bool:
    """Whether this job's command line sets `group` (`task=...`) or a key under it (`task.data.x=...`)."""
    return any(override_of(o, (group,)) for o in command_line_overrides())
