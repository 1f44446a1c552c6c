"""CPU threads for torch. On a small machine that other work shares, torch's default (one thread per core)
thrashes: on 2 cores with a second job running, the quickstart's LoRA took 24-27 s/step with 2 threads and
5.5 s/step with 1. `threads=<n>` sets the count; `threads=auto` takes the cores idle at start-up; the default
(null) keeps torch's count and says in one line when cores are busy, because a thread count that follows the
machine's load would make two runs of one command differ in their last bits."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from neft_lab.errors import ConfigError

logger = logging.getLogger(__name__)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no /proc (macOS, Windows)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(interval: float = 0.3) -> float | None:
    """How many of the machine's cores other processes keep busy now (sampled over `interval` seconds, while
    this process sleeps); None when it cannot be measured."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times()
    if second is None or second[1] == first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_threads(cores: int, busy: float) -> int:
    """The threads that fit in the idle cores: at least 1, at most `cores`."""
    return max(1, min(cores, round(cores - busy)))


def computes_on_gpu(cfg: Any) -> bool:
    """Whether the run computes on a GPU (then torch's CPU threads only feed it: no advice about them)."""
    import torch

    trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
    accelerator = str((trainer or {}).get("accelerator", "auto")).lower()
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def apply_threads(cfg: Any, on_gpu: bool = False) -> int:
    """Set torch's CPU threads from `cfg.threads` (an int, auto, or null) and return the count in use."""
    import torch  # here, not at the top: validation imports this module before torch is needed

    value = cfg.get("threads") if hasattr(cfg, "get") else None
    if value is not None and str(value) != "auto":
        try:
            count = int(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"threads={value!r}: give a number of threads, auto (the idle cores) or null"
            ) from None
        torch.set_num_threads(count)
        return count
    if on_gpu:
        return torch.get_num_threads()
    cores, busy = usable_cores(), busy_cores()
    if busy is None:
        return torch.get_num_threads()
    fit = free_threads(cores, busy)
    if str(value) == "auto":
        torch.set_num_threads(fit)
        logger.info("threads=auto: %d thread(s) (%.1f of %d cores busy at start-up)", fit, busy, cores)
        return fit
    current = torch.get_num_threads()
    if fit < current:
        logger.warning(
            "%.1f of %d cores are busy with other work and torch will use %d threads: pass threads=%d (or "
            "threads=auto) to avoid thrashing (README: CPU runs)",
            busy,
            cores,
            current,
            fit,
        )
    return current
