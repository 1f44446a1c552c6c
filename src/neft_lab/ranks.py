"""Which process this is, before any process group exists (standard library only: the CLI asks before
torch is imported)."""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "JSM_NAMESPACE_RANK")


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only one).

    torchrun sets RANK, SLURM's srun SLURM_PROCID, Lightning's own launcher LOCAL_RANK and NODE_RANK
    for the processes it starts: rank 0 is the one for which all of them are 0 or unset.
    """
    return all(int(os.environ.get(key) or 0) == 0 for key in RANK_VARIABLES)
