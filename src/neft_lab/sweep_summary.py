"""Resumable multiruns: what each job of a sweep did, counted in one line when the sweep ends.

A sweep is rerun with the same command (and the same `hydra.sweep.dir`) after it was killed or some of
its jobs failed. Every job then lands in its old folder (`<sweep dir>/<job num>`), where
`run_folder.prepare` skips a finished run (complete metrics.json, same config) and `resume=auto` continues
an interrupted one from `checkpoints/last.ckpt`. `SweepSummary` (a Hydra callback, `conf/hydra/default.yaml`)
tells which of the four happened to each job, from its folder before and after the job:

- skipped: its metrics.json was there before and is untouched;
- resumed: it had a checkpoint to continue from (and `resume` was not false);
- run: it started from scratch;
- failed: it raised (recorded by `job_failed`, see `neft_lab.__main__`), or it started and never ended
  (killed: no outcome recorded).

Each job writes its outcome to `<sweep dir>/.jobs/<job num>.json` (in whatever process or machine the
launcher ran it), and `on_multirun_end` prints `sweep: N jobs: a skipped, b resumed, c run, d failed`. In a
multirun a failed job does not stop the others (Hydra's basic launcher would stop at a `SystemExit`, and
its sweeper would end the sweep with the first error, before this summary): it hands the sweeper the worst
value (`worst_value`), and the command exits 1 at the end when any job failed (`exit_on_failure`; off for the
learning-rate search, where a diverged trial is an answer).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

OUTCOMES = ("skipped", "resumed", "run", "failed")
JOBS = ".jobs"  # below the sweep folder: one <job num>.json per job
_FAILURES: list[str] = []  # job_failed() → on_job_end, in the job's own process (Hydra's run_job calls both)


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (False outside Hydra: tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def worst_value() -> float:
    """What a failed job hands the sweeper: the worst value for its direction (Optuna: +inf when minimizing,
    -inf when maximizing; optuna 2.10 refuses NaN and the Hydra plugin then ends the whole study), else NaN."""
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = str(OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="")).lower()
    except ValueError:  # not inside a Hydra job
        return float("nan")
    if direction.endswith("minimize"):
        return float("inf")
    return float("-inf") if direction.endswith("maximize") else float("nan")


def job_failed(error: BaseException) -> float:
    """Record that this multirun job failed; returns `worst_value()` for the sweeper."""
    first_line = (str(error).splitlines() or [""])[0]
    _FAILURES.append(f"{type(error).__name__}: {first_line}"[:500])
    return worst_value()


def _rank_zero() -> bool:
    """Only one process of a multi-task (DDP) job records its outcome."""
    from neft_lab.ranks import launched_as_rank_zero

    return launched_as_rank_zero()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _folder_state(config: DictConfig) -> dict[str, Any]:
    run_dir = Path(str(config.hydra.runtime.output_dir))
    return {
        "metrics": _mtime(run_dir / "metrics.json"),
        "checkpoint": (run_dir / "checkpoints" / "last.ckpt").exists(),
    }


def outcome(before: dict[str, Any], after: dict[str, Any], failed: bool, resume: Any) -> str:
    """One of OUTCOMES from the job's folder before and after it ran."""
    if failed:
        return "failed"
    if before["metrics"] is not None and before["metrics"] == after["metrics"]:
        return "skipped"
    if before["checkpoint"] and str(resume).lower() not in ("false", "none", "never"):
        return "resumed"
    return "run"


def _write(path: Path, record: dict[str, Any]) -> None:
    from neft_lab.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def read_outcomes(sweep_dir: Path) -> list[dict[str, Any]]:
    """The records of the jobs of the last invocation of a sweep, by job number."""
    records = []
    for file in (Path(sweep_dir) / JOBS).glob("*.json"):
        try:
            records.append(json.loads(file.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: int(r.get("num", 0)))


def summary_line(records: list[dict[str, Any]], sweep_dir: Path) -> str:
    counts = Counter(r.get("outcome") or "failed" for r in records)  # no outcome: killed while running
    parts = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
    return f"sweep: {len(records)} jobs: {parts} ({sweep_dir})"


def failure_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per failed job: the overrides that set it apart from the others, the error, its folder."""
    common = (
        set.intersection(*(set(r.get("overrides") or []) for r in records)) if len(records) > 1 else set()
    )
    return [
        f"  job {r.get('num')} ({' '.join(o for o in r.get('overrides') or [] if o not in common)}): "
        f"{r.get('error') or 'started but never ended (killed?)'} [{r.get('dir')}]"
        for r in records
        if (r.get("outcome") or "failed") == "failed"
    ]


class SweepSummary(Callback):
    """Per-job outcome records and the sweep's summary line (see the module's docstring)."""

    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure
        self._before: dict[str, dict[str, Any]] = {}
        self._sweep_dir: Path | None = None
        self._ended = False

    # ---- the launching process ----
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        shutil.rmtree(self._sweep_dir / JOBS, ignore_errors=True)  # count this invocation only
        self._ended = False
        atexit.register(self._at_exit)  # the sweeper raised (a job killed under submitit, ...): still count

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._ended = True
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = read_outcomes(sweep_dir)
        failures = failure_lines(records)
        logger.info("%s", "\n".join([summary_line(records, sweep_dir), *failures]))
        if failures and self.exit_on_failure:
            print(f"neft_lab error: {len(failures)} job(s) of the sweep failed (above)", file=sys.stderr)
            raise SystemExit(1)

    def _at_exit(self) -> None:
        if self._ended or self._sweep_dir is None:
            return
        records = read_outcomes(self._sweep_dir)
        lines = [
            summary_line(records, self._sweep_dir) + " (the sweep stopped early)",
            *failure_lines(records),
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)

    # ---- each job's process ----
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN or not _rank_zero():
            return
        _FAILURES.clear()
        self._before[str(config.hydra.runtime.output_dir)] = _folder_state(config)
        _write(self.record_path(config), self.record(config, outcome=None))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        before = self._before.pop(str(config.hydra.runtime.output_dir), None)
        if before is None:  # not a multirun job, or not rank 0
            return
        from hydra.core.utils import JobStatus

        failed = job_return.status == JobStatus.FAILED or bool(_FAILURES)
        error = _FAILURES[0] if _FAILURES else None
        if job_return.status == JobStatus.FAILED and error is None:
            error = f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        result = outcome(before, _folder_state(config), failed, OmegaConf.select(config, "resume"))
        _write(self.record_path(config), self.record(config, outcome=result, error=error))
        _FAILURES.clear()

    @staticmethod
    def record_path(config: DictConfig) -> Path:
        return Path(str(config.hydra.sweep.dir)) / JOBS / f"{config.hydra.job.num}.json"

    @staticmethod
    def record(config: DictConfig, **values: Any) -> dict[str, Any]:
        return {
            "num": int(config.hydra.job.num),
            "dir": str(config.hydra.runtime.output_dir),
            "overrides": list(config.hydra.overrides.task),
            "pid": os.getpid(),
            **values,
        }
