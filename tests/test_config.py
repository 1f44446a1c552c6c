"""Every config group composes, and the knobs a researcher sweeps are config values."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from neft_lab.config import conf_dir
from neft_lab.data.task import Task
from neft_lab.strategies import build_strategy

GROUPS = [
    "model",
    "task",
    "strategy",
    "selection",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "experiment",
    "debug",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_every_required_group_exists():
    for group in GROUPS:
        assert (conf_dir() / group).is_dir(), group
        assert _options(group), f"conf/{group} has no options"


@pytest.mark.parametrize("task", _options("task"))
def test_every_task_composes_and_parses(compose_cfg, task):
    required = {"translation": ["task.source_lang=en", "task.target_lang=fr"]}  # your own pair: no default
    cfg = compose_cfg([f"task={task}", "paths.run_dir=/tmp/x", *required.get(task, [])])
    parsed = Task.from_config(cfg.task)
    assert ("{instruction}" if parsed.kind == "instruction" else "{source}") in parsed.prompt
    assert parsed.metrics
    metrics = {"translation": {"bleu", "chrf"}, "summarization": {"rouge"}, "instruction": set()}
    expected = metrics[parsed.kind]
    assert expected <= set(parsed.metrics)


@pytest.mark.parametrize("strategy", _options("strategy"))
def test_every_strategy_builds(compose_cfg, strategy):
    cfg = compose_cfg([f"strategy={strategy}", "paths.run_dir=/tmp/x"])
    built = build_strategy(cfg.strategy)
    # a file is a strategy of its own name, or a preset of one (lora_authors: LoRA with the authors' settings)
    presets = {"lora_authors": "lora"}
    assert built.name == presets.get(strategy, strategy) == cfg.strategy.name


@pytest.mark.parametrize(
    "option",
    [
        f"{g}={o}"
        for g in ("model", "trainer", "logger", "callbacks", "experiment", "debug")
        for o in _options(g)
    ],
)
def test_every_option_resolves(compose_cfg, option):
    cfg = compose_cfg([option, "paths.run_dir=/tmp/x", "model.name_or_path=some/model"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["paths"]["run_dir"] == "/tmp/x"


def test_sweepable_knobs_are_config_values(compose_cfg):
    cfg = compose_cfg(
        [
            "strategy=lora",
            "optim.lr=1e-4",
            "strategy.r=32",
            "strategy.alpha=64",
            "loader.batch_size=4",
            "task.max_prompt_tokens=99",
            "trainer.precision=bf16-mixed",
            "seed=3",
            "trainer.max_steps=7",
            "strategy.target_modules=[q_proj,v_proj]",
            "paths.run_dir=/tmp/x",
        ]
    )
    assert (cfg.optim.lr, cfg.strategy.r, cfg.strategy.alpha, cfg.loader.batch_size) == (1e-4, 32, 64, 4)
    assert (cfg.task.max_prompt_tokens, cfg.trainer.precision, cfg.seed, cfg.trainer.max_steps) == (
        99,
        "bf16-mixed",
        3,
        7,
    )
    assert build_strategy(cfg.strategy).target_modules == ["q_proj", "v_proj"]


def test_unknown_option_names_the_choices(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="wmt_zh_en"):
        compose_cfg(["task=wmt_zh_fr"])


def test_hub_model_name_is_the_basename(compose_cfg):
    cfg = compose_cfg(["model=hub", "model.name_or_path=meta-llama/Llama-2-7b-hf", "paths.run_dir=/tmp/x"])
    assert cfg.model.name == "Llama-2-7b-hf"


def test_tests_use_a_temporary_cache(compose_cfg):
    """tests/conftest.py points NEFT_LAB_CACHE at a session temp folder: no test writes into ~/.cache/neft_lab."""
    import tempfile
    from pathlib import Path

    from neft_lab.models.gemma_gguf import default_cache_dir

    user_cache = Path.home() / ".cache"
    for cache in (Path(compose_cfg(["paths.run_dir=/tmp/x"]).paths.cache_dir), default_cache_dir()):
        assert not cache.resolve().is_relative_to(user_cache.resolve()), cache
        assert cache.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()), cache


@pytest.mark.slow
def test_slow_tests_keep_the_user_cache():
    """The real-Gemma tests (marked slow) need the converted model in the user's cache, so they keep it."""
    import os
    from pathlib import Path

    from conftest import USER_CACHE
    from neft_lab.models.gemma_gguf import default_cache_dir

    assert os.environ.get("NEFT_LAB_CACHE") == USER_CACHE
    assert default_cache_dir() == (
        Path(USER_CACHE).expanduser() if USER_CACHE else Path.home() / ".cache" / "neft_lab"
    )
