"""Callbacks the sweep tests load into `python -m neft_lab` subprocesses (PYTHONPATH=tests), apart from
conftest.py, whose import would point the subprocess's cache at a temporary folder of its own."""

from __future__ import annotations

import os
import signal
from pathlib import Path


class KillOnce:
    """A Lightning callback that SIGKILLs its own process at `step` of the job whose `seed` is `kill_seed`, once
    (the `flag` file remembers it), as a node failure or `kill -9` would: nothing is saved, nothing cleaned up.
    `+callbacks.kill._target_=sweep_helpers.KillOnce '+callbacks.kill.seed=${seed}' ...`"""

    def __new__(cls, step: int, flag: str, seed: int, kill_seed: int):
        import lightning as L

        class _Kill(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                if seed == kill_seed and trainer.global_step >= step and not Path(flag).exists():
                    Path(flag).write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()
