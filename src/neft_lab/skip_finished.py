"""Launchers that skip a sweep's finished jobs before starting a process (or a SLURM job) for them.

A rerun sweep (after a kill, a failed job, a new seed added to the list) lands every job in its old folder,
where `run_folder.prepare` finds a finished run and returns at once. Under Hydra's basic launcher that costs a
config composition per job; under `hydra/launcher=local|parallel|slurm` it cost a process start-up (torch,
Lightning: seconds each on a small machine) or a queued SLURM job that does nothing. `SkipFinished` makes the
same check in the launching process first (`finished_job`), hands the sweeper the value the job would have
returned, records the job as "skipped" for the sweep's summary line (`sweep_summary`), and launches only
the rest, with their own job numbers (so each still lands in its own folder).

The launcher classes themselves live in `hydra_plugins/neft_lab_launchers` (Hydra instantiates launchers
only from its plugin namespace); `conf/hydra/launcher/{local,parallel,slurm}.yaml` select them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

logger = logging.getLogger(__name__)


def finished_job(hydra_context: Any, config: DictConfig, overrides: list[str], num: int) -> Any | None:
    """The `JobReturn` of job `num` when its folder already holds the finished run it would produce (same
    config, metrics.json written, `resume` not false); None when the job has work to do or cannot be judged
    here (the job itself then says why)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobReturn, JobStatus

    from neft_lab import run_folder

    previous = HydraConfig.instance().cfg
    try:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.num = num
        output_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        with read_write(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(sweep_config)  # ${hydra:runtime.output_dir} in paths.run_dir
        task_cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        metrics = run_folder.finished_unchanged(task_cfg, Path(str(task_cfg.paths.run_dir)))
        if metrics is None:
            return None
        from neft_lab.lr_search import objective
        from neft_lab.results import main_metric

        value = objective(task_cfg, main_metric(metrics.get("after")))
        _record_skipped(sweep_config)
    except Exception as err:  # noqa: BLE001 - a config the job will refuse: the job says why, in its folder
        logger.debug("job %d: cannot tell whether it finished before (%s): launching it", num, err)
        return None
    finally:
        if previous is not None:
            HydraConfig.instance().set_config(previous)
    return JobReturn(
        overrides=list(overrides),
        cfg=task_cfg,
        hydra_cfg=sweep_config,
        working_dir=str(output_dir),
        task_name=str(OmegaConf.select(sweep_config, "hydra.job.name", default="") or ""),
        status=JobStatus.COMPLETED,
        _return_value=value,
    )


def _record_skipped(sweep_config: DictConfig) -> None:
    from neft_lab.io import atomic_write_json
    from neft_lab.sweep_summary import SweepSummary

    path = SweepSummary.record_path(sweep_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, SweepSummary.record(sweep_config, outcome="skipped", error=None))


def contiguous_blocks(indices: Sequence[int]) -> list[list[int]]:
    """[0, 1, 3, 4, 7] → [[0, 1], [3, 4], [7]]: each block launches with its first job's number."""
    blocks: list[list[int]] = []
    for i in indices:
        if blocks and blocks[-1][-1] == i - 1:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


class SkipFinished:
    """Mixin before a Hydra launcher class: launch only the jobs with work left (see the module's docstring)."""

    config: DictConfig | None
    hydra_context: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        assert self.config is not None
        results: dict[int, Any] = {}
        for i, overrides in enumerate(job_overrides):
            done = finished_job(self.hydra_context, self.config, list(overrides), initial_job_idx + i)
            if done is not None:
                results[i] = done
        pending = [i for i in range(len(job_overrides)) if i not in results]
        if results:
            logger.info(
                "%d of %d jobs finished before (same config, metrics.json there): not launched",
                len(results),
                len(job_overrides),
            )
        for block in contiguous_blocks(pending):
            launched = super().launch([job_overrides[i] for i in block], initial_job_idx + block[0])  # type: ignore[misc]
            results.update(zip(block, launched, strict=True))
        return [results[i] for i in range(len(job_overrides))]


class RemoveFinishedSubmititFolders:
    """Mixin for submitit's local executor: a completed job's `.submitit/<job id>/` (its pickles and a copy of
    its console output; the run folder keeps the log) is removed; a failed job's stays for its traceback."""

    params: dict[str, Any]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from hydra.core.utils import JobStatus

        results = super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        pattern = str(self.params.get("submitit_folder", ""))
        if "%j" not in pattern:
            return results
        for result in results:
            job_id = (
                OmegaConf.select(result.hydra_cfg, "hydra.job.id") if result.hydra_cfg is not None else None
            )
            if result.status == JobStatus.COMPLETED and job_id and not str(job_id).startswith("job_id_for_"):
                shutil.rmtree(pattern.replace("%j", str(job_id)), ignore_errors=True)
        if all(result.status == JobStatus.COMPLETED for result in results):
            shutil.rmtree(pattern, ignore_errors=True)  # the literal "%j" folder: submission pickles
        parent = Path(pattern.split("%j")[0])
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        return results
