"""Stopping signals in every stage, and workers that die with their launcher (standard library only: imported
by the CLI before anything heavy).

- `install()` (the CLI, before Hydra starts): SIGTERM, SIGINT and SIGUSR1 (outside SLURM, where Lightning's
  auto-requeue owns it) raise `Stopped` wherever the process is — loading, the evaluation after training,
  an export, a sweep between two jobs — so it ends with exit 143 (130 for Ctrl-C) and one line saying how to
  resume (`report`), never with the bare `-15` of an unhandled SIGTERM. During training
  `training.stops.StepBoundaryStop` takes them over and stops at the next step boundary instead.
- `watch_launcher()` (a job of a parallel or local sweep, in a process its launcher started): a daemon
  thread that stops the job within a second of the launcher's death (it would otherwise train on, orphaned,
  for hours).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("neft_lab")

STOPPED_EXIT = 143  # 128 + SIGTERM: what a scheduler expects from a job it stopped
INTERRUPTED_EXIT = 130  # 128 + SIGINT
LAUNCHER_ENV = "NEFT_LAB_LAUNCHER"  # "<host>:<pid>" of the process that ran the command
_context: dict[str, Any] = {"run_dir": None, "multirun": False}


class Stopped(SystemExit):
    """A stopping signal: SystemExit with 143 (SIGTERM, SIGUSR1) or 130 (SIGINT)."""

    def __init__(self, signum: int, saved: str | None = None) -> None:
        super().__init__(INTERRUPTED_EXIT if signum == signal.SIGINT else STOPPED_EXIT)
        self.signum = signum
        self.saved = saved  # what was saved where it stopped (training), for the message
        self.reported = False


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stopping_signals() -> list[int]:
    """SIGTERM and SIGINT, and SIGUSR1 outside SLURM (Lightning's auto-requeue uses it there)."""
    return [signal.SIGTERM, signal.SIGINT] + ([] if "SLURM_JOB_ID" in os.environ else [signal.SIGUSR1])


def _raise(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def install(argv: list[str] | None = None) -> None:
    """Make every stopping signal raise `Stopped` (main thread only), and note what the command is."""
    argv = sys.argv[1:] if argv is None else argv
    _context["multirun"] = any(a in ("-m", "--multirun") for a in argv)
    os.environ[LAUNCHER_ENV] = f"{socket.gethostname()}:{os.getpid()}"  # for the jobs it may launch
    _install_handlers()


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in stopping_signals():
        if signum == signal.SIGUSR1 and signal.getsignal(signum) not in (signal.SIG_DFL, None):
            continue  # someone else's (a scheduler's wrapper)
        signal.signal(signum, _raise)


def set_run_dir(run_dir: Path | None) -> None:
    """The run folder a stop would leave resumable (None: nothing to resume, rerun the command)."""
    _context["run_dir"] = run_dir


def current_run_dir() -> Path | None:
    return _context["run_dir"]


def hint() -> str:
    run_dir = _context["run_dir"]
    if _context["multirun"]:
        resume = "rerun the same command to go on: finished jobs are skipped, a stopped one resumes"
        return resume + (f" (this job alone: python -m neft_lab resume={run_dir})" if run_dir else "")
    if run_dir is not None:
        return f"Resume with: python -m neft_lab resume={run_dir}"
    return "nothing was finished: rerun the command"


def report(err: Stopped, where: str = "") -> None:
    """One line on stderr and in the run log: what stopped it, where, what was kept, how to go on."""
    if err.reported:
        return
    err.reported = True
    what = "interrupted (SIGINT)" if err.signum == signal.SIGINT else f"stopped ({signal_name(err.signum)})"
    kept = f": {err.saved}" if err.saved else ""
    message = f"neft_lab: {what}{' ' + where if where else ''}{kept}. {hint()}"
    for handler in logging.getLogger().handlers:  # the run log (the console gets it once, below)
        if isinstance(handler, logging.FileHandler):
            record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None)
            handler.handle(record)
    print(message, file=sys.stderr, flush=True)


# ---- a job whose launcher died ----------------------------------------------------------------------------
_watching: list[int] = []
_orphaned = threading.Event()  # the launcher died: this process ends with its job


def launched_by_another_process() -> int | None:
    """The pid of the launcher when this process runs a job that a launcher on this machine started (a
    joblib/loky worker or a submitit local job, both children of the command's process), else None."""
    host, _, pid = os.environ.get(LAUNCHER_ENV, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    return int(pid) if int(pid) == os.getppid() else None


def watch_launcher(poll_seconds: float = 1.0, grace_seconds: float = 120.0) -> bool:
    """In a job process a launcher started: stop (SIGTERM to itself: training stops at its next step boundary and
    saves last.ckpt; then exit after `grace_seconds` in any case) once the launcher is gone. A parent-pid watch
    rather than PR_SET_PDEATHSIG, which fires when the launcher's *thread* that started the worker ends (loky
    starts workers from helper threads too). Returns whether it watches."""
    launcher = launched_by_another_process()
    if launcher is None or _watching:
        return bool(_watching)
    _watching.append(launcher)
    _install_handlers()  # this job's stopping signals end it with 143 and a hint, as in the launcher
    _context["multirun"] = True

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        print(
            f"neft_lab: the launcher (pid {launcher}) is gone: stopping this job", file=sys.stderr, flush=True
        )
        _orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_seconds)
        os._exit(STOPPED_EXIT)

    threading.Thread(target=watch, name="neft_lab-launcher-watch", daemon=True).start()
    return True


def exit_if_orphaned() -> None:
    """At the end of a job: when its launcher is gone, end the worker too (it would wait for jobs forever)."""
    if _orphaned.is_set():
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        logging.shutdown()
        os._exit(STOPPED_EXIT)
