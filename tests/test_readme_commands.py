"""Every command the README prints is run by a test as printed (issue 19, A2).

Two tests per README command. `test_readme_command_parses_and_composes`: each `python -m neft_lab ...` line of
the README's bash blocks goes through what `python -m neft_lab` does before a job starts: Hydra's argument
parser (overrides on both sides of `--config-dir` fail here, as they do in a shell), the plugin and unknown-key
checks of `neft_lab.__main__.cli`, then the composition of the config the first job of a sweep would run,
resolved, with its strategy built. Placeholders (`...`, `<run>`, `<data overrides>`) are the only
substitutions there: a bare one becomes an override (the user's go there), a value that is one becomes a
dummy path, a group choice that is one keeps the default.

`test_readme_command_runs`: every command of the bash blocks (not only `python -m neft_lab`), classified, and
executed on the tiny model with the substitutions its docstring lists, or composed, parsed or skipped with the
reason that docstring gives.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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


def readme_entries() -> list[tuple[list[str], str]]:
    """(tokens, text as printed) of every shell command of the README's bash blocks, in order: continuations
    joined, `a && b` split, comments dropped from the tokens."""
    entries = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split("&&"):
                tokens = shlex.split(part, comments=True)
                if tokens:
                    entries.append((tokens, part.strip()))
    return entries


def readme_lines() -> list[list[str]]:
    """The shell commands of the README's bash blocks, as tokens."""
    return [tokens for tokens, _ in readme_entries()]


def env_and_command(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 bash x.sh` → ({A: 1, B: 2}, [bash, x.sh])."""
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        key, value = tokens[0].split("=", 1)
        env[key], tokens = value, tokens[1:]
    return env, tokens


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


def compose_as_cli(argv: list[str]):
    """What `python -m neft_lab ARGV` does before its first job: parse, check plugins and keys, compose it."""
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
    return cfg


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command_parses_and_composes(argv):
    compose_as_cli(substitute(argv))


SCRIPTS = sorted(
    {c[1] for c in map(lambda t: env_and_command(t)[1], readme_lines()) if c[:1] == ["bash"] and len(c) > 1}
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


# ------------------------------------------------------------------------------------------------------------
# Every README command executed: test_readme_command_runs (its docstring says what runs how, and why)

DRIVER = REPO / "tests" / "readme_driver.py"
TINY = [  # appended to every executed `python -m neft_lab` line (after the README's own overrides: they win)
    "model=tiny",
    "trainer=cpu",
    "logger=none",
    "threads=1",  # CI shares 2 cores
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "task.data.max_train=16",
    "task.data.max_val=4",
    "task.data.max_test=4",
    "task.max_new_tokens=16",
    "analysis.max_new_tokens=16",
    "++selection.reference.steps=2",  # the paper presets' 3,200 (++: a key of NeFT's selections only)
]
PINS = {  # axes of a sweep file pinned on the command line: one seed, a paper point, a 2-step reference
    "seed": "seed=0",
    "budget": "budget=paper_9",  # the paper's "NeFT 9%" (150,000 vectors of Llama-2-7B: 'NeFT 9.12%' here)
    "selection.reference.steps": "selection.reference.steps=2",
}
RUNS = {  # a run placeholder: the newest run of that strategy on the embedded task an earlier line made
    "run": "outputs/runs/embedded_en_fr/neft/*",
    "neft run": "outputs/runs/embedded_en_fr/neft/*",
    "full run": "outputs/runs/embedded_en_fr/full/*",
    "random run": "outputs/runs/embedded_en_fr/random_neuron/*",
}
SETS = {  # a neuron-set file named without a path: a NeFT run's set on this task, or on the other one
    "selection.file": "outputs/runs/embedded_en_fr/neft/*",
    "sets.own": "outputs/runs/embedded_en_fr/neft/*",
    "sets.other": "outputs/runs/wmt_en_zh/neft/*",
}
DATA_KEYS = {f"task.data.{k}" for k in ("data_dir", "train_dir", "val_dir", "test_dir")}
SKIPPED = {
    "python3": "sets up a virtual environment (CI's .ci/run does the same)",
    ".": "sets up a virtual environment (CI's .ci/run does the same)",
    "pip": "installs packages (CI's .ci/run does the same)",
    "wandb": "needs a W&B server and account; the W&B sweep files match their Hydra grids (tests/test_sweeps.py)",
    "jupyter": "starts a notebook server; tests/test_notebooks.py executes both notebooks on tiny runs",
}
PARSED_ONLY = {
    "scripts/table_small_cpu.sh": "bash -n only: as printed ~5 CPU-hours on Gemma and ../shared/data; its tiny "
    "dry run (~100 s) runs in tests/test_table_small.py",
    "scripts/lr_search.sh": "bash -n only: as printed it needs a CUDA GPU (its one-line refusal without one: "
    "tests/test_validation.py); its tiny dry run takes ~2 min, its Optuna search and final seeds run in small "
    "in tests/test_launchers.py",
}
PAPER_TABLE_DRY_RUN = {  # scripts/paper_table_small.sh's header, with fixture data, one seed, short outputs
    "MODEL": "tiny", "STEPS": "4", "REF_STEPS": "4", "TEST": "4", "BATCH": "4", "TRAINER": "cpu", "SEEDS": "0",
    "EXTRA": "threads=1 task.max_new_tokens=16 task.data.max_val=8",
}  # fmt: skip


def classify(tokens: list[str]) -> tuple[str, str]:
    """How test_readme_command_runs treats a README command, and why: run | compose | parse | skip."""
    env, command = env_and_command(tokens)
    if command[:3] == ["python", "-m", "pytest"]:
        return "skip", "the test suite itself"
    if command[:3] == ["python", "-m", "neft_lab"]:
        if "hydra/launcher=slurm" in command:
            return "compose", "composed only (test_readme_command_parses_and_composes): no SLURM here"
        return "run", ""
    if command[:2] == ["python", "-m"] and command[2].startswith("neft_lab."):
        return "run", ""
    if command[:1] == ["bash"] and command[1:2] and command[1] in PARSED_ONLY:
        return "parse", PARSED_ONLY[command[1]]
    if command[:2] == ["bash", "scripts/paper_table_small.sh"]:
        if env.get("LAUNCHER") == "slurm":
            return "compose", "each command the script makes composed (its `python` recorded): no SLURM here"
        if not env:
            return "run", ""
    if command[0] in SKIPPED:
        return "skip", SKIPPED[command[0]]
    return "unknown", f"no rule for `{' '.join(tokens)}`: add one to tests/test_readme_commands.py"


ENTRIES = readme_entries()


def test_every_readme_command_has_a_rule():
    unknown = [text for tokens, text in ENTRIES if classify(tokens)[0] == "unknown"]
    assert not unknown, unknown
    assert sum(classify(tokens)[0] == "run" for tokens, _ in ENTRIES) >= 40


def _task_of(argv: list[str]) -> str | None:
    """The task a command runs: its `task=`, else its experiment's, else None (the default, embedded)."""
    task = None
    for token in argv:
        key, _, value = token.partition("=")
        if key == "experiment" and not _is_placeholder(value):
            preset = (conf_dir() / "experiment" / f"{value}.yaml").read_text()
            task = next(iter(re.findall(r"override /task: (\S+)", preset)), task)
        elif key == "task" and not _is_placeholder(value):
            task = value
    return task


def write_data(folder: Path, task: str | None) -> Path:
    """A small local data folder for `task`: train/valid/test as line-aligned zh/en/fr/de files, or JSONL
    documents for a summarization task. 240 training lines: a task without a validation folder holds
    `task.data.val_size` (200) of them out."""
    summarization = (
        task is not None and "task_base_summarization" in (conf_dir() / "task" / f"{task}.yaml").read_text()
    )
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 240), ("valid", 6), ("test", 6)):
        if summarization:
            rows = [{"document": f"Story {i}. The town built a bridge in year {i}.", "summary": f"A bridge {i}."}
                    for i in range(n)]  # fmt: skip
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            continue
        lines = {
            "zh": [f"第{i}只猫在桌子上。" for i in range(n)],
            "en": [f"Cat number {i} is on the table." for i in range(n)],
            "fr": [f"Le chat numéro {i} est sur la table." for i in range(n)],
            "de": [f"Katze Nummer {i} ist auf dem Tisch." for i in range(n)],
        }
        for lang, text in lines.items():
            (folder / f"{split}.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
    return folder


def _sweep_axes(argv: list[str]) -> list[str]:
    if "--config-name" not in argv:
        return []
    name = argv[argv.index("--config-name") + 1]
    return list(OmegaConf.load(REPO / "sweeps" / f"{name}.yaml").hydra.sweeper.params)


def _placeholder(key: str, value: str) -> str:
    """A placeholder value as what an earlier command made (tests/readme_driver.py resolves `@{...}`)."""
    if key == "report.dir":  # outputs/multiruns/<time>: the Table-2 sweep above the report lines
        return "@{sweep:budget_neft}"
    if key == "ckpt" and value == "outputs/runs/<task>/<strategy>/<time>":
        return "@{newest:outputs/runs/*/*/*}"
    value = value.replace("<scores>", "@{logged:score:scores: (\\S+)}")  # what the stage=score line printed
    value = value.replace("<folder>", "exported")
    for name, pattern in RUNS.items():
        value = value.replace(f"<{name}>", f"@{{newest:{pattern}}}")
    assert not _is_placeholder(value), f"no substitution for {key}={value}"
    return value


def tiny_argv(argv: list[str], ws: Path) -> list[str]:
    """A README `python -m neft_lab ARGV` as the tiny command the test runs (test_readme_command_runs)."""
    out, task, data_given = [], _task_of(argv), False
    for token in argv:
        key, sep, value = token.partition("=")
        bare = key.lstrip("+~")
        if not sep:  # flags and their values (-m, --config-dir sweeps); a bare placeholder goes
            if not _is_placeholder(token):
                out.append(token)
        elif bare in ("model", "trainer", "logger", "threads", "hydra/launcher") or bare.startswith(
            ("model.", "hydra.launcher.")
        ):
            continue  # TINY: the tiny model on CPU, no logger, one thread; the basic launcher
        elif bare == "task" and _is_placeholder(value):
            continue  # `task=...`: any task, the default (embedded) stands in
        elif bare in DATA_KEYS:  # ../shared/data/wmt21_zh_en → <ws>/data/wmt21_zh_en, a fixture
            name = bare.rsplit(".", 1)[-1] if _is_placeholder(value) else Path(value).name
            out.append(f"{key}={write_data(ws / 'data' / name, task)}")
            data_given = True
        elif bare == "selection.reference.steps":
            out.append(f"{key}=2")
        elif bare == "selection.budget.value" and "selection.budget.kind=lora_rank" in argv:
            out.append(f"{key}=2")  # the tiny model's 512 up/down vectors hold no LoRA rank 256
        elif bare == "selection.files" and "/" not in value:  # [a.safetensors,b.safetensors]
            files = [f"@{{newest:{SETS[k]}}}/neuron_set.safetensors" for k in ("sets.own", "sets.other")]
            out.append(f"{key}=[{','.join(files)}]")
        elif bare in SETS and "/" not in value:  # +sets.own=A +sets.other=B
            out.append(f"{key}=@{{newest:{SETS[bare]}}}/neuron_set.safetensors")
        elif _is_placeholder(value):
            out.append(f"{key}={_placeholder(bare, value)}")
        else:
            out.append(token)
    if task not in (None, "embedded") and not data_given:  # the task's files: a fixture folder
        out.append(f"task.data.data_dir={write_data(ws / 'data' / task, task)}")
    return out + TINY + [PINS[axis] for axis in _sweep_axes(argv) if axis in PINS]


def record_script(script: str, env: dict[str, str], ws: Path) -> list[list[str]]:
    """The arguments of every `python` command `bash SCRIPT` (run in `ws`) starts, recorded, not run, by a
    `python` first on PATH."""
    shim, record = ws / "shim", ws / f"record-{len(list(ws.glob('record-*')))}.jsonl"
    shim.mkdir(exist_ok=True)
    (shim / "python").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['NEFT_LAB_RECORD'], 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (shim / "python").chmod(0o755)
    path = f"{shim}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, **env, "PATH": path, "NEFT_LAB_RECORD": str(record)}
    subprocess.run(["bash", script], cwd=ws, env=env, check=True, capture_output=True, timeout=60)
    return [json.loads(line) for line in record.read_text().splitlines()]


def _alias(command: list[str]) -> str | None:
    """The driver id of a command whose output a later README line names (`@{sweep:..}`, `@{logged:..}`)."""
    if "--config-name" in command and "budget_neft" in command:
        return "budget_neft"
    if "stage=score" in command:
        return "score"
    return None


def build_plan(ws: Path) -> tuple[list[dict], dict[str, int]]:
    """The driver's commands for every executed README entry, in README order, and the entry of each."""
    for folder in ("sweeps", "scripts"):  # the workspace stands in for the repository root
        (ws / folder).symlink_to(REPO / folder)
    (ws / "xnli.jsonl").write_text(  # `selection.probe.file=xnli.jsonl`: the probe holds out 1,000 examples
        "".join(json.dumps({"text": f"A sentence of kind {i % 3}, number {i}.", "label": i % 3}) + "\n"
                for i in range(1060))
    )  # fmt: skip
    plan, owner = [], {}
    for n, (tokens, _) in enumerate(ENTRIES):
        if classify(tokens)[0] != "run":
            continue
        env, command = env_and_command(tokens)
        if command[0] == "bash":  # its dry run, the data its defaults name as fixtures
            for name in ("wmt18-20_zh_en_train", "wmt21_zh_en"):
                write_data(ws / "data" / name, "wmt_zh_en")
            env = {**env, **PAPER_TABLE_DRY_RUN, "DATA": str(ws / "data")}
            recorded = record_script(command[1], env, ws)
            assert recorded and all(c[:2] == ["-m", "neft_lab"] for c in recorded), recorded
            steps = [{"module": "neft_lab", "argv": c[2:]} for c in recorded]
        elif command[2] == "neft_lab":
            steps = [{"module": "neft_lab", "argv": tiny_argv(command[3:], ws)}]
        else:
            steps = [{"module": command[2], "argv": command[3:]}]
        for k, step in enumerate(steps):
            name = _alias(command) or f"L{n}.{k}"
            assert name not in owner, name
            plan.append({"id": name, **step})
            owner[name] = n
    return plan, owner


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every executed README command run once, in README order: (workspace, {entry: [results]}, driver output)."""
    ws = tmp_path_factory.mktemp("readme")
    plan, owner = build_plan(ws)
    (ws / "plan.json").write_text(json.dumps(plan, indent=1))
    env = {**os.environ, "NEFT_LAB_ROOT": str(ws), "NEFT_LAB_CACHE": str(ws / "cache"), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(ws / "plan.json"), str(ws / "results.json")],
        cwd=ws, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    results = json.loads((ws / "results.json").read_text()) if (ws / "results.json").exists() else []
    by_entry: dict[int, list[dict]] = {}
    for result in results:
        by_entry.setdefault(owner[result["id"]], []).append(result)
    return ws, by_entry, done.stdout[-3000:] + done.stderr[-3000:]


def _changed(result: dict, pattern: str) -> list[str]:
    return [p for p in result["changed"] if re.fullmatch(pattern, p)]


def _check(text: str, argv: list[str], result: dict, ws: Path) -> None:
    """A README `python -m neft_lab` line finished (exit 0) and made what it says."""
    log = Path(result["log"]).read_text(errors="replace")
    assert result["status"] == 0, f"`{text}` failed ({result['status']}) as\n{log[-4000:]}"
    stage = next((t.split("=", 1)[1] for t in argv if t.startswith("stage=")), "fit")
    if "-m" in argv:
        (sweep,) = result["sweeps"]
        jobs = len(list((ws / sweep).glob("*/metrics.json")))
        assert jobs and f"sweep: {jobs} jobs: 0 skipped, 0 resumed, {jobs} run, 0 failed" in log, log[-3000:]
    elif stage == "fit":
        (metrics,) = _changed(result, r"outputs/runs/.*/metrics\.json")
        assert json.loads((ws / metrics).read_text())["after"]
        named = re.search(r"#\s*→\s*(\w+)", text)  # `# → translation_en_fr`: the task's name, in the folder's
        assert not named or f"/{named.group(1)}/" in metrics, metrics
    elif stage in ("reference", "score"):  # an earlier line's NeFT run made them (the same key): the cache's
        named = re.findall(r"(?:reference model|scores): (\S+)", log)
        assert named and Path(named[-1]).exists(), log[-3000:]
    else:
        made = {
            "eval": r"outputs/evals/.*/metrics\.json",
            "export": r"outputs/runs/.*/export/config\.json|exported/config\.json",
            "report": r"outputs/multiruns/.*/report/table\.md",
            "select": r"outputs/sets/neft6\.safetensors",
            "analyze": r"outputs/runs/.*/analysis/.*\.json",
        }[stage]
        assert _changed(result, made), f"`{text}` made nothing like {made}: {result['changed'][:20]}"


@pytest.mark.parametrize("entry", range(len(ENTRIES)), ids=[text[:70] for _, text in ENTRIES])
def test_readme_command_runs(entry, request):
    """Every command of the README's bash blocks, executed as printed with the tiny substitutions below.

    Executed, in README order, in one Python process (tests/readme_driver.py; not pytest's own, as Hydra's entry
    point sets logging, signal handlers and singletons): `neft_lab.__main__.cli()` with the command's argv, i.e.
    what `python -m neft_lab` runs, in a workspace standing in for the repository root (`sweeps/`, `scripts/`
    linked, `outputs/` and the cache inside), once for all the entries: ~2.5 min on 2 busy cores (110 s of CPU):
    - every `python -m neft_lab ...` line: runs and stages (fit, eval, export, report, reference, score, select,
      analyze), multiruns (`-m`, with `--config-dir sweeps --config-name ...`) with Hydra's basic launcher, so
      the `hydra/launcher=local|parallel` lines run their jobs one after another (the launchers themselves run
      in tests/test_launchers.py). In a sweep file's grid the seed is pinned to 0, `budget` to paper_9 and the
      reference steps to 2 (PINS): 1-4 jobs each instead of up to 36; the other axes run as written, every
      value of every axis composes in tests/test_sweeps.py;
    - every `python -m neft_lab.<module>` line (`neft_lab.cache list|prune`), on the workspace's cache;
    - `bash scripts/paper_table_small.sh`: its CPU dry run (the script's header, PAPER_TABLE_DRY_RUN, with the
      data as fixtures and one seed). The script itself runs, with a `python` first on PATH that records its
      commands (record_script); the driver executes them, ending with the script's report.
    Composed only, as no SLURM is here: `hydra/launcher=slurm` lines (test_readme_command_parses_and_composes)
    and `LAUNCHER=slurm ... paper_table_small.sh` (each command it makes, here).
    Parsed only (`bash -n`), their dry runs costing minutes and running elsewhere: scripts/table_small_cpu.sh
    and scripts/lr_search.sh (PARSED_ONLY). Skipped, with the reason: environment set-up (venv, pip), the test
    suite itself, W&B's server, Jupyter's server (SKIPPED).

    Tiny substitutions (tiny_argv): TINY appended (model=tiny, trainer=cpu, logger=none, threads=1, 2 steps,
    16/4/4 train/val/test examples, 16 new tokens, a 2-step NeFT reference); the line's own `model=`, `model.*`,
    `trainer=`, `logger=`, `threads=`, `hydra/launcher=`, `hydra.launcher.*` dropped; `selection.reference.
    steps` → 2; a LoRA-rank budget → rank 2 (the tiny model holds no rank 256). Data: a data folder
    (`../shared/data/wmt21_zh_en`, `/data/xsum`, `...`) becomes a fixture folder of that name (write_data), a
    task that reads files but got no folder gets one; `xnli.jsonl` is a fixture. Placeholders, as what an
    earlier line made (`@{...}`, resolved by the driver): `<run>`, `<neft run>`, `<full run>`, `<random run>`
    (RUNS); `ckpt=outputs/runs/<task>/<strategy>/<time>` → the newest run folder; `report.dir=outputs/
    multiruns/<time>` → the budget_neft sweep above it; `<scores>` → the file the `stage=score` line printed;
    `<folder>` → `exported`; neuron sets named without a path (`A`, `B`, `a.safetensors`) → NeFT runs' sets
    (SETS); a bare `...` or `<data overrides>` → nothing (or the fixture data).
    """
    tokens, text = ENTRIES[entry]
    how, why = classify(tokens)
    env, command = env_and_command(tokens)
    if how == "skip":
        pytest.skip(why)
    if how == "parse":
        subprocess.run(["bash", "-n", str(REPO / command[1])], check=True)
        pytest.skip(why)
    if how == "compose":
        if command[0] == "bash":
            ws = request.getfixturevalue("tmp_path")
            (ws / "scripts").symlink_to(REPO / "scripts")
            recorded = record_script(command[1], env, ws)
            assert recorded and all(c[:2] == ["-m", "neft_lab"] for c in recorded), recorded
            for argv in recorded:
                compose_as_cli(argv[2:])
        pytest.skip(why)
    ws, by_entry, driver = request.getfixturevalue("executed")
    assert entry in by_entry, f"the driver did not get to `{text}`:\n{driver}"
    for result in by_entry[entry]:
        if command[:3] == ["python", "-m", "neft_lab"]:
            _check(text, command[3:], result, ws)
        else:  # neft_lab.cache, or a command the script made
            log = Path(result["log"]).read_text(errors="replace")
            assert result["status"] == 0, (
                f"`{' '.join(result['argv'])}` failed ({result['status']}) as\n{log[-4000:]}"
            )
    if command[0] == "bash":
        assert (ws / "outputs" / "paper_small" / "report" / "table.md").exists()
