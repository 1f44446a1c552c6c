"""The submitit and joblib launchers, skipping a sweep's finished jobs before launching (neft_lab.skip_finished).

Selected by `conf/hydra/launcher/{local,slurm,parallel}.yaml`; each class exists only when its plugin
(the `sweeps` extra) is installed.
"""

from __future__ import annotations

from neft_lab.skip_finished import RemoveFinishedSubmititFolders, SkipFinished

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # pragma: no cover - without the `sweeps` extra
    pass
else:

    class SkippingLocalLauncher(SkipFinished, RemoveFinishedSubmititFolders, LocalLauncher):
        """submitit's local executor: a process per unfinished job; completed jobs' .submitit folders removed."""

    class SkippingSlurmLauncher(SkipFinished, SlurmLauncher):
        """submitit's SLURM executor: an array job of the unfinished jobs only."""


try:
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
except ImportError:  # pragma: no cover - without the `sweeps` extra
    pass
else:

    class SkippingJoblibLauncher(SkipFinished, JoblibLauncher):
        """joblib's worker processes, for the unfinished jobs only."""
