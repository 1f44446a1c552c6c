"""Sweeps that fan out: submitit's local executor (the SLURM launcher's code path), parallel local jobs,
Optuna's learning-rate search, resumable multiruns and their summary line, and the `sweeps` extra.

Each test runs `python -m neft_lab -m ...` in a session of its own (killed as a whole at the end, so no
launcher job outlives it) on the tiny model: 4 training steps, validation every 2, 4 test sentences.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, free_port, read_metrics
from neft_lab.sweep_summary import read_outcomes

FAST = [
    "experiment=smoke",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "eval.before=false",
    "task.data.embedded.n_test=4",
]
NEFT = ["strategy=neft", "++selection.reference.steps=4"]
REFERENCE_RUN = "reference run: full fine-tuning"  # logged once per reference fine-tune (neft_lab.chain)
SUBMITIT = "hydra_plugins.hydra_submitit_launcher"


def _plugin(module: str) -> None:
    pytest.importorskip(module, reason="the launcher/sweeper plugins: pip install -e '.[sweeps]'")


def neft_lab(args: list[str], cwd: Path, timeout: int = 600, helpers: bool = False) -> tuple[int, str]:
    """`python -m neft_lab ARGS` in a new session; returns (exit status, stdout + stderr). Whatever the command
    leaves running (launcher jobs, loky workers) is killed with it."""
    env = {**os.environ, "WANDB_MODE": "offline", "NEFT_LAB_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    env["MASTER_PORT"] = str(free_port())
    if helpers:  # the subprocess loads tests/sweep_helpers.py callbacks
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "neft_lab", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    return process.returncode, out


def _job_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted(sweep.glob("*/*.log")))


def test_submitit_local_sweep_writes_four_runs_and_a_report(tmp_path):
    """4 NeFT budgets as 4 processes at once through the submitit launcher; they share one reference fine-tune
    (computed once, under the cache's file lock), and the report has a row for each."""
    _plugin(SUBMITIT)
    sweep = tmp_path / "sweep"
    status, out = neft_lab(
        ["-m", "hydra/launcher=local", *FAST, *NEFT, f"paths.cache_dir={tmp_path / 'cache'}",
         "budget=0.03,0.06,0.09,0.12", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    assert status == 0, out[-4000:]
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1", "2", "3"]
    assert "sweep: 4 jobs: 0 skipped, 0 resumed, 4 run, 0 failed" in out
    jobs = read_outcomes(sweep)
    assert len({job["pid"] for job in jobs}) == 4  # a process each (submitit's local executor)
    assert not (sweep / ".submitit").exists()  # completed jobs leave no submitit folder behind
    assert _job_logs(sweep).count(REFERENCE_RUN) == 1

    # a fifth budget: the four finished jobs are skipped in the launcher, only job 4 gets a process
    status, out = neft_lab(
        ["-m", "hydra/launcher=local", *FAST, *NEFT, f"paths.cache_dir={tmp_path / 'cache'}",
         "budget=0.03,0.06,0.09,0.12,0.15", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    assert status == 0, out[-4000:]
    assert "4 of 5 jobs finished before" in out
    assert "sweep: 5 jobs: 4 skipped, 0 resumed, 1 run, 0 failed" in out
    again = read_outcomes(sweep)
    launcher_pids = {job["pid"] for job in again if job["outcome"] == "skipped"}
    assert len(launcher_pids) == 1 and again[4]["pid"] not in launcher_pids  # no process for a skipped job
    assert (sweep / "4" / "metrics.json").exists() and not (sweep / ".submitit").exists()

    status, out = neft_lab(["stage=report", f"report.dir={sweep}"], tmp_path)
    assert status == 0, out[-3000:]
    table = (sweep / "report" / "table.md").read_text()
    for label in ("NeFT 3%", "NeFT 6%", "NeFT 9%", "NeFT 12%"):
        assert f"| {label} |" in table
    assert "Learning rate: 0.003 (every run)" in table


@pytest.mark.fault
def test_killed_sweep_rerun_runs_only_the_unfinished_jobs(tmp_path):
    """The sweep process is SIGKILLed in job 2 (after jobs 0 and 1 finished, with a checkpoint at step 2); the
    same command again skips 0 and 1, resumes 2 and runs 3."""
    sweep = tmp_path / "sweep"
    command = [
        "-m", *FAST, "strategy=full", "seed=0,1,2,3", f"hydra.sweep.dir={sweep}",
        "+callbacks.kill._target_=sweep_helpers.KillOnce", "+callbacks.kill.step=3",
        f"+callbacks.kill.flag={tmp_path / 'killed'}", "+callbacks.kill.seed=${seed}", "+callbacks.kill.kill_seed=2",
    ]  # fmt: skip
    status, first = neft_lab(command, tmp_path, helpers=True)
    assert status == -signal.SIGKILL, first[-3000:]
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]
    assert first.count("results in") == 2 and (sweep / "2" / "checkpoints" / "last.ckpt").exists()

    status, again = neft_lab(command, tmp_path, helpers=True)
    assert status == 0, again[-3000:]
    assert again.count("is a finished run") == 2  # jobs 0 and 1: nothing to do
    assert again.count("resuming from") == 1  # job 2, from its step-2 checkpoint
    assert again.count("trainable=") == 2  # the runs that trained: jobs 2 and 3 only
    assert "sweep: 4 jobs: 2 skipped, 1 resumed, 1 run, 0 failed" in again
    assert [job["outcome"] for job in read_outcomes(sweep)] == ["skipped", "skipped", "resumed", "run"]
    assert all(read_metrics(sweep / str(n))["train"]["steps"] == 4 for n in range(4))


@pytest.mark.fault
def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    """Job 0 fails (a bad value): job 1 still runs, the summary names the failure, the command exits 1; a rerun
    skips job 1 and fails job 0 again."""
    sweep = tmp_path / "sweep"
    command = ["-m", *FAST, "strategy=full", "optim.scheduler=bogus,linear", f"hydra.sweep.dir={sweep}"]
    status, out = neft_lab(command, tmp_path)
    assert status == 1, out[-3000:]
    assert (sweep / "1" / "metrics.json").exists() and not (sweep / "0" / "metrics.json").exists()
    assert "sweep: 2 jobs: 0 skipped, 0 resumed, 1 run, 1 failed" in out
    assert "job 0 (optim.scheduler=bogus): ConfigError: optim.scheduler='bogus'" in out
    assert "Traceback" not in out
    status, out = neft_lab(command, tmp_path)
    assert status == 1 and "sweep: 2 jobs: 1 skipped, 0 resumed, 0 run, 1 failed" in out


def test_parallel_jobs_share_one_neft_reference(tmp_path):
    """hydra/launcher=parallel (joblib): two NeFT budgets in two worker processes at once wait for one
    another on the reference's file lock; it is computed once and both select from it."""
    _plugin("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    status, out = neft_lab(
        ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *FAST, *NEFT,
         f"paths.cache_dir={tmp_path / 'cache'}", "budget=0.03,0.06", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    assert status == 0, out[-4000:]
    assert "sweep: 2 jobs: 0 skipped, 0 resumed, 2 run, 0 failed" in out
    assert len({job["pid"] for job in read_outcomes(sweep)}) == 2  # two worker processes
    assert _job_logs(sweep).count(REFERENCE_RUN) == 1
    (cache,) = (tmp_path / "cache" / "neft").iterdir()
    assert (cache / "scores.safetensors").exists() and not list(cache.glob(".*.tmp"))
    shares = sorted(read_metrics(sweep / n)["trainable_percent"] for n in ("0", "1"))
    assert shares[0] < shares[1]


def test_optuna_lr_search_picks_the_lowest_validation_loss_and_the_final_seeds_use_it(tmp_path):
    """sweeps/lr_search.yaml, 3 trials: the best lr is the trial with the lowest best_val_loss; the final
    seeds run at it (`python -m neft_lab.lr_search <search>`) and the report says which lr they used."""
    _plugin("hydra_plugins.hydra_optuna_sweeper")
    search, final = tmp_path / "search", tmp_path / "final"
    status, out = neft_lab(
        ["-m", "--config-dir", str(REPO / "sweeps"), "--config-name", "lr_search", *FAST, "strategy=full",
         "hydra.sweeper.n_trials=3", "optim.lr=tag(log, interval(1e-4, 1e-1))", f"hydra.sweep.dir={search}"],
        tmp_path,
    )  # fmt: skip
    assert status == 0, out[-4000:]
    assert "sweep: 3 jobs: 0 skipped, 0 resumed, 3 run, 0 failed" in out
    trials = {
        float(OmegaConf.load(d / "config.yaml").optim.lr): read_metrics(d)["train"]["best_val_loss"]
        for d in search.glob("[0-9]*")
    }
    assert len(trials) == 3 and len(set(trials.values())) == 3, trials
    best = min(trials, key=trials.get)
    results = OmegaConf.load(search / "optimization_results.yaml")
    assert results.best_params["optim.lr"] == best and results.best_value == pytest.approx(trials[best])

    chosen = subprocess.run(
        [sys.executable, "-m", "neft_lab.lr_search", str(search)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert chosen == [f"optim.lr={best}"]
    status, out = neft_lab(
        ["-m", *FAST, "strategy=full", "seed=0,1", *chosen, f"hydra.sweep.dir={final}"], tmp_path
    )
    assert status == 0, out[-3000:]
    assert [float(OmegaConf.load(final / n / "config.yaml").optim.lr) for n in ("0", "1")] == [best, best]
    status, out = neft_lab(["stage=report", f"report.dir={final}"], tmp_path)
    assert status == 0 and f"Learning rate: {best:.3g} (every run)" in out


def test_a_local_job_of_two_tasks_is_one_ddp_run(tmp_path):
    """hydra.launcher.tasks_per_node=2: the job's two processes are the ranks of one DDP run (as a SLURM job's
    tasks are); both hand their result back, one run folder, one outcome."""
    _plugin(SUBMITIT)
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    sweep = tmp_path / "sweep"
    status, out = neft_lab(
        ["-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", "trainer.precision=32-true", *FAST, "strategy=full", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    assert status == 0, out[-4000:]
    assert "sweep: 1 jobs: 0 skipped, 0 resumed, 1 run, 0 failed" in out
    logs = _job_logs(sweep)  # both ranks log to the run folder's log (submitit's copy is removed on success)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert "replicas agree after training" in logs and not (sweep / ".submitit").exists()
    assert read_metrics(sweep / "0")["train"]["steps"] == 4


# ---- in-process: configs, the extra, the objective, the report ----------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "argv, package",
    [
        (["-m", "hydra/launcher=slurm", "strategy=full,lora"], "hydra-submitit-launcher"),
        (["-m", "hydra/launcher=local"], "hydra-submitit-launcher"),
        (["-m", "hydra/launcher=parallel"], "hydra-joblib-launcher"),
        (["-m", "--config-dir", str(REPO / "sweeps"), "--config-name", "lr_search"], "hydra-optuna-sweeper"),
    ],
    ids=["slurm", "local", "parallel", "optuna"],
)
def test_a_missing_plugin_names_the_extra_to_install(monkeypatch, capsys, argv, package):
    from neft_lab import __main__ as entry
    from neft_lab.launchers import PLUGINS, missing_plugin_error

    monkeypatch.setattr(sys, "argv", ["neft_lab", *argv])
    monkeypatch.setattr(entry, "main", lambda: None)  # with the plugins, the command would start
    if missing_plugin_error(argv) is None:  # the extra is installed here: nothing to refuse
        entry.cli()
    for module, engine, _ in PLUGINS.values():  # now as if the extra were not installed
        monkeypatch.setitem(sys.modules, module, None)
        monkeypatch.setitem(sys.modules, engine, None)
    with pytest.raises(SystemExit) as stopped:
        entry.cli()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert (
        package in err
        and "pip install 'neft_lab[sweeps]'" in err
        and err.startswith("neft_lab error: hydra/")
    )


def test_the_sweeps_extra_pins_the_plugins_and_ci_installs_it():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["sweeps"]}
    for name in (
        "hydra-submitit-launcher",
        "hydra-joblib-launcher",
        "hydra-optuna-sweeper",
        "optuna",
        "submitit",
    ):
        assert any(s.operator == "<" for s in extra[name].specifier), f"{name}: no upper bound"
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert extra[name].specifier.contains(installed), (
            f"{name} {installed} is outside {extra[name].specifier}"
        )
    assert re.search(r"pip install .*\"\.\[[^\]]*sweeps[^\]]*\]\"", (REPO / ".ci" / "run").read_text())


def test_the_launcher_and_sweeper_configs_compose():
    from hydra import compose, initialize_config_dir

    from neft_lab.config import conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        for launcher, target in (
            ("slurm", "SlurmLauncher"),
            ("local", "LocalLauncher"),
            ("parallel", "JoblibLauncher"),
        ):
            module = "hydra_plugins.hydra_joblib_launcher" if launcher == "parallel" else SUBMITIT
            if not _importable(module):
                continue
            cfg = compose("config", [f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith(target)
            if launcher == "slurm":
                assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 1
                assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.timeout_min >= 60
        callbacks = compose("config", [], return_hydra_config=True).hydra.callbacks
        assert callbacks.sweep_summary._target_ == "neft_lab.sweep_summary.SweepSummary"
    if _importable("hydra_plugins.hydra_optuna_sweeper"):
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "sweeps")):
            cfg = compose("lr_search", [f"hydra.searchpath=[file://{conf_dir()}]"], return_hydra_config=True)
        assert cfg.sweep_objective == "val_loss" and cfg.hydra.sweeper.direction == "minimize"
        assert cfg.hydra.sweeper.params["optim.lr"].startswith("tag(log, interval(")


def _importable(module: str) -> bool:
    from neft_lab.launchers import importable

    return importable(module)


def test_val_loss_objective_returns_the_best_validation_loss(tiny_overrides, tmp_path):
    from neft_lab.config import compose
    from neft_lab.errors import ConfigError
    from neft_lab.pipeline import run

    extra = ["strategy=full", "trainer.max_steps=2", "trainer.val_check_interval=1", "eval.before=false",
             "task.data.embedded.n_test=4"]  # fmt: skip
    loss = run(compose(tiny_overrides + extra + ["sweep_objective=val_loss"]))
    assert loss == read_metrics(tmp_path / "run")["train"]["best_val_loss"] and 0 < loss < 10
    with pytest.raises(ConfigError, match="sweep_objective=bleu: choose one of test, val_loss"):
        run(compose(tiny_overrides + extra + ["sweep_objective=bleu"]))


def test_report_shows_each_methods_learning_rate(tmp_path):
    from neft_lab.config import compose
    from neft_lab.pipeline import run

    for name, strategy, lr in (("full", "full", 2e-5), ("lora", "lora", 3e-4)):
        folder = tmp_path / name
        folder.mkdir()
        metrics = {"model": "m", "task": "t", "seed": 0, "strategy": strategy, "trainable_percent": 1.0,
                   "lora_r": 8, "after": {"bleu": 10.0}}  # fmt: skip
        (folder / "metrics.json").write_text(json.dumps(metrics))
        cfg = {"optim": {"lr": lr}, "strategy": {"name": strategy}, "task": {"kind": "translation"}}
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    run(compose(["stage=report", f"report.dir={tmp_path}", f"report.out={tmp_path / 'out'}"]))
    lines = [li for li in (tmp_path / "out" / "table.md").read_text().splitlines() if li.startswith("|")]
    assert lines[0].startswith("| method | lr | t BLEU |")
    assert lines[2].startswith("| Full | 2e-05 |") and lines[3].startswith("| LoRA r=8 | 0.0003 |")
    assert "lr" in (tmp_path / "out" / "table.csv").read_text().splitlines()[0].split(",")


def test_the_slurm_launcher_config_becomes_these_sbatch_options(tmp_path, monkeypatch):
    """hydra/launcher=slurm through submitit's own translation (as the plugin's launch does it) into the sbatch
    header of a 36-job array: no cluster needed (a stand-in `srun` on PATH), every key accepted."""
    _plugin(SUBMITIT)
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import _make_sbatch_string

    from neft_lab.config import conf_dir, register_resolvers

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    register_resolvers()
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        launcher = compose("config", overrides, return_hydra_config=True).hydra.launcher
        params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"),
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    assert executor._executor.max_num_timeout == 3
    sbatch = _make_sbatch_string(
        command="python -u -m submitit.core._submit x", folder=executor._executor.folder,
        **{**executor._executor.parameters, "map_count": 36},
    )  # fmt: skip
    for option in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8",
                   "--mem=64GB", "--time=1440", "--array=0-35%32", "--signal=USR2@120", "--job-name=neft_lab"):  # fmt: skip
        assert f"#SBATCH {option}\n" in sbatch, option


@pytest.mark.parametrize("direction, worst", [("minimize", float("inf")), ("maximize", float("-inf"))])
def test_a_failed_trial_hands_optuna_the_worst_value(monkeypatch, direction, worst):
    """optuna 2.10 refuses NaN (and the Hydra plugin then ends the whole study): a failed job returns ±inf."""
    import math

    from hydra.core.hydra_config import HydraConfig

    from neft_lab.sweep_summary import job_failed, worst_value

    assert math.isnan(worst_value())  # outside a Hydra job
    hydra_cfg = OmegaConf.create({"sweeper": {"direction": direction}})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    assert job_failed(RuntimeError("diverged")) == worst


@pytest.mark.bad_input
def test_best_lr_of_a_search_whose_trials_all_failed_is_refused(tmp_path):
    from neft_lab.lr_search import main

    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params: {optim.lr: 0.1}\nbest_value: .inf\n"
    )
    assert main([str(tmp_path)]) == 2
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params: {optim.lr: 0.1}\nbest_value: 1.5\n"
    )
    assert main([str(tmp_path)]) == 0
    assert main([str(tmp_path / "nowhere")]) == 2


def test_skipped_jobs_leave_the_others_their_job_numbers():
    """The launcher launches the unfinished jobs in blocks that start at their own numbers (their folders)."""
    from neft_lab.skip_finished import contiguous_blocks

    assert contiguous_blocks([0, 1, 3, 4, 7]) == [[0, 1], [3, 4], [7]]
    assert contiguous_blocks([]) == [] and contiguous_blocks([5]) == [[5]]
