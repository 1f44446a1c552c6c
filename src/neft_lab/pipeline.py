"""Compose and dispatch a run: `run(cfg)` checks the config, sets up what the stage needs (the run folder, its
lock, the resumed run's config, seeding, threads, Lightning's log routing) and hands over to the stage
registered under `cfg.stage` (`neft_lab.stages`). What a stage does lives in its own module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neft_lab import run_folder, signals, stages
from neft_lab.errors import ConfigError
from neft_lab.ranks import launched_as_rank_zero
from neft_lab.results import main_metric
from neft_lab.validation import validate


def run(cfg: DictConfig) -> float | None:
    """Run the configured stage; returns the main test metric, or what `sweep_objective` names (for Hydra sweepers).

    The folder Hydra made for the command (`hydra.run.dir`) is left only when it holds a result:
    `stage=report`/`export` remove it, `resume=<folder>` removes it and logs into <folder>, and a command
    that fails before writing anything but `.hydra/`, its log and `config.yaml` moves it to
    `<paths.output_dir>/failed/...` and names that log in the error (run_folder.set_aside_failed).
    """
    outermost = stages.run_depth() == 0
    # the launching process only: DDP ranks it starts rerun the command in the same folder
    folder = run_folder.hydra_output_dir() if outermost and launched_as_rank_zero() else None
    output_dir = Path(str(OmegaConf.select(cfg, "paths.output_dir", default=None) or "outputs"))
    state: dict[str, Any] = {"folder": folder, "cfg": cfg}
    with stages.running() as depth:
        try:
            result = _run(cfg, state, output_dir)
            from neft_lab.lr_search import objective  # what a sweeper gets: sweep_objective=test|val_loss

            result = objective(cfg, result)
        except BaseException as err:
            stopped = isinstance(err, signals.Stopped)
            if stopped:  # one line with the resume hint, while the run folder is known
                signals.report(err)
            if state["folder"] is not None:  # a stopped run's folder stays where the hint says
                keep = state.get("keep", False) or (stopped and signals.current_run_dir() is not None)
                run_folder.after_failure(err, cfg, state["folder"], output_dir, keep=keep)
            raise
        finally:
            if depth == 1:
                signals.set_run_dir(None)
            if state.get("lock") is not None:
                state["lock"].release()
    if state["folder"] is not None and OmegaConf.select(cfg, "stage") in run_folder.NO_FOLDER_STAGES:
        run_folder.discard(state["folder"], output_dir)
    return result


def _run(cfg: DictConfig, state: dict[str, Any], output_dir: Path) -> float | None:
    validate(cfg)  # the whole config (stage, paths, values), before any model or data is loaded
    stage = stages.named(cfg.stage)
    if stage.lightning_logs:
        from neft_lab.training.trainer import route_lightning_logs_through_hydra

        route_lightning_logs_through_hydra()
    if not stage.run_folder:  # writes beside its inputs or to its own output folder
        _apply_threads(cfg, stage)
        return stage.run(cfg, None)
    cfg = _config_of_resumed_run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    resumed = str(cfg.get("resume", "auto")).lower() not in ("auto", "false", "none", "never")
    if state["folder"] is not None and resumed and state["folder"].resolve() != run_dir.resolve():
        run_folder.continue_log_in(state["folder"], run_dir, output_dir)  # work goes on in <run_dir>
        state.update(folder=run_dir, keep=True)  # the resumed run's folder: never set aside
    keep, state["keep"] = state.get("keep", False), True  # a folder another job works in is never set aside
    state["lock"] = run_folder.RunFolderLock(run_dir).acquire() if launched_as_rank_zero() else None
    state["keep"] = keep
    finished = run_folder.prepare(cfg, run_dir)
    if finished is not None:
        return main_metric(finished.get("after"))
    if cfg.stage == "fit" and not stages.nested_run():
        signals.set_run_dir(run_dir)  # a stop from here on says how to resume this folder
    if cfg.stage == "fit" and state["lock"] is not None:  # rank 0, holding the lock
        run_folder.remove_leftovers(run_dir)  # what a killed job's writes left
    hydra_folder = state["folder"]
    fresh = str(cfg.get("resume", "auto")).lower() in ("false", "none", "never")
    if hydra_folder is not None and not resumed and (fresh or not (hydra_folder / ".hydra").exists()):
        run_folder.save_hydra_files(hydra_folder, state["cfg"])  # only now: a refused or no-op rerun keeps it
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _apply_threads(cfg, stage)
    return stage.run(cfg, run_dir)


def _apply_threads(cfg: DictConfig, stage: stages.Stage) -> None:
    if stage.threads:
        from neft_lab.threads import apply_threads, computes_on_gpu

        apply_threads(cfg, on_gpu=computes_on_gpu(cfg))


def _config_of_resumed_run(cfg: DictConfig) -> DictConfig:
    """`resume=<run folder>`: continue that run, in that folder, with the config it was started with."""
    mode = str(cfg.get("resume", "auto"))
    if mode.lower() in ("auto", "false", "none", "never"):
        return cfg
    folder = Path(mode).expanduser()
    if not (folder / "config.yaml").exists():
        raise ConfigError(f"resume={mode}: not a run folder (no config.yaml there)")
    saved = OmegaConf.load(folder / "config.yaml")
    run_folder.check_saved_config(saved, cfg, folder / "config.yaml")  # it names no class to run
    saved = run_folder.moved_to(saved, folder)  # a copied or moved folder: checkpoints and logs go into it
    saved.resume = str(folder)
    return saved
