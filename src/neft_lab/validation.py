"""Check the whole composed config before any model or data is loaded.

`validate(cfg)` runs first (in the CLI before torch, transformers and Lightning are imported, and again in
`pipeline.run`): a bad value costs a second and one line naming the key, the value and the fix, instead of a
traceback after a reference fine-tune, a training run or an export. Each stage owns its check
(`neft_lab.stages.<name>.check`, composed from `neft_lab.config_checks`); this module only picks it.
"""

from __future__ import annotations

from omegaconf import DictConfig

from neft_lab import stages
from neft_lab.config_checks import value_of


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first setting of `cfg` that cannot run; return quietly otherwise."""
    stage = stages.named(value_of(cfg, "stage"))
    from neft_lab.lr_search import check_objective  # what a sweeper gets back: test | val_loss

    check_objective(cfg)
    stage.check(cfg)
