"""`python -m neft_lab [overrides]`: the Hydra entry point over `conf/`."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from neft_lab.config import conf_dir, register_resolvers

logger = logging.getLogger("neft_lab")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from neft_lab.errors import ConfigError
    from neft_lab.pipeline import run

    try:
        return run(cfg)
    except ConfigError as err:  # a mistake the user can fix: say what and how, no traceback
        logger.error("%s", err)
        print(f"neft_lab error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
