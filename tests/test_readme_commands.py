"""Every command the README prints parses and composes as printed (issue 19, A2).

Each `python -m neft_lab ...` line of the README's bash blocks goes through what `python -m neft_lab` does
before a job starts: Hydra's argument parser (overrides on both sides of `--config-dir` fail here, as they
do in a shell), the plugin and unknown-key checks of `neft_lab.__main__.cli`, then the composition of the
config the first job of a sweep would run, resolved, with its strategy built. Placeholders (`...`, `<run>`,
`<data overrides>`) are the only substitutions: a bare one becomes an override (the user's go there), a
value that is one becomes a dummy path, a group choice that is one keeps the default. Running the commands is left to the tests of each feature (they need data and models); a `bash
scripts/...` line must name a script that exists and parses.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import REPO
from neft_lab.__main__ import unknown_key_error
from neft_lab.config import conf_dir, register_resolvers
from neft_lab.launchers import missing_plugin_error
from neft_lab.strategies import build_strategy

README = REPO / "README.md"
PLACEHOLDER = "/nonexistent/readme-placeholder"
STAND_IN = "seed=0"  # an override where the README leaves the user's own
GROUPS = {str(d.relative_to(conf_dir())) for d in conf_dir().rglob("*") if d.is_dir()}


def readme_lines() -> list[str]:
    """The shell lines of the README's bash blocks, continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split("&&"):
                tokens = shlex.split(part, comments=True)
                if tokens:
                    lines.append(tokens)
    return lines


def neft_lab_commands() -> list[list[str]]:
    return [t[3:] for t in readme_lines() if t[:3] == ["python", "-m", "neft_lab"]]


def _is_placeholder(text: str) -> bool:
    return "..." in text or bool(re.search(r"<[^>]*>|^<|>$", text))


def substitute(argv: list[str]) -> list[str]:
    out = []
    for token in argv:
        if "=" in token and not token.startswith("-"):
            key, value = token.split("=", 1)
            if _is_placeholder(value) and key in GROUPS:  # `task=...`: any task; the default stands in
                continue
            if _is_placeholder(value):
                token = f"{key}=[{PLACEHOLDER}]" if value.startswith("[") else f"{key}={PLACEHOLDER}"
            out.append(token)
        elif not _is_placeholder(token):
            out.append(token)
        elif not out or out[-1] != STAND_IN:  # `...`, `<data overrides>`: the user's overrides go here
            out.append(STAND_IN)
    return out


def first_job(overrides: list[str]) -> list[str]:
    """A sweep's first job: every sweep override (`a,b`, `choice(...)`, `range(...)`) at its first value."""
    job = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            job.append(f"{override.input_line.split('=', 1)[0]}={first}")
        else:
            job.append(override.input_line)
    return job


COMMANDS = neft_lab_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 30  # a change to the block format must not silently empty this test


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command_parses_and_composes(argv):
    argv = substitute(argv)
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`python -m neft_lab {' '.join(argv)}`: Hydra refuses the arguments as printed")
    assert missing_plugin_error(argv) is None
    assert unknown_key_error(argv) is None
    register_resolvers()
    overrides = first_job(args.overrides) + [
        f"hydra.searchpath=[file://{conf_dir()}]",
        "paths.run_dir=/tmp/x",
    ]
    config_dir = str(REPO / args.config_dir) if args.config_dir else str(conf_dir())
    with initialize_config_dir(version_base="1.3", config_dir=config_dir):
        cfg = compose(config_name=args.config_name or "config", overrides=overrides, return_hydra_config=True)
    for key in cfg:  # every interpolation resolves (budgets, paper points, ...); hydra's own needs a job
        if key != "hydra":
            OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
    assert build_strategy(cfg.strategy).name == cfg.strategy.name


SCRIPTS = sorted(
    {t[1] for t in readme_lines() if t[0] == "bash" and len(t) > 1 and t[1].startswith("scripts/")}
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_script_exists_and_parses(script):
    assert (REPO / script).is_file(), f"README runs {script}, which does not exist"
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


CACHE_COMMANDS = [t[3:] for t in readme_lines() if t[:3] == ["python", "-m", "neft_lab.cache"]]


@pytest.mark.parametrize("argv", CACHE_COMMANDS, ids=[" ".join(c) for c in CACHE_COMMANDS])
def test_readme_cache_command_runs(argv, tmp_path):
    from neft_lab import cache

    (tmp_path / "neft" / "m-t-K4-s0-x" / "reference").mkdir(parents=True)
    assert cache.main([*argv, "--dir", str(tmp_path)]) == 0
