"""Training on several processes: DDP and FSDP2, for every strategy.

`trainer=ddp` is Lightning's DDP: each rank holds the whole model and DDP all-reduces the gradients
of the parameters that require them — for NeFT only the slice parameters, for LoRA the adapters.
`trainer=fsdp` is `FSDP2Strategy`: Lightning's `ModelParallelStrategy` with every process in the
data-parallel dimension; `CausalLMModule.configure_model` applies `fully_shard` (FSDP2) to a copy
of the model, decoder layer by decoder layer, and gathers the trained weights back into the
original (plain) model on rank 0 at the end of `fit`.

After `fit` only global rank 0 goes on (`Trainer`): restoring the best checkpoint, export, test
generation and `metrics.json` happen once, on one process. Before the Trainer exists (NeFT's
reference run, the neuron-set file) `neft_lab.ranks.launched_as_rank_zero` tells the ranks apart from the
launcher's environment. See docs/distributed.md.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from neft_lab.neurons.sliced import SlicedLinear

logger = logging.getLogger(__name__)


def uses_fsdp2(trainer_cfg: Any) -> bool:
    """Whether a trainer config asks for `ModelParallelStrategy` (`trainer=fsdp`), i.e. sharded weights."""
    strategy = trainer_cfg.get("strategy") if trainer_cfg is not None else None
    if isinstance(strategy, ModelParallelStrategy):
        return True
    target = strategy.get("_target_") if hasattr(strategy, "get") else None
    if not target:
        return False
    from hydra.utils import get_class

    return issubclass(get_class(target), ModelParallelStrategy)


class Trainer(L.Trainer):
    """`lightning.Trainer` whose `fit` returns on global rank 0 only.

    After distributed training every other rank exits (status 0): what a run does after `fit` —
    restore the best checkpoint, export, generate on the test set, write `metrics.json` and
    predictions — then happens exactly once. A single-process run is unaffected.
    """

    def fit(self, *args: Any, **kwargs: Any) -> None:
        super().fit(*args, **kwargs)
        if self.world_size > 1 and not self.is_global_zero:
            logger.info("rank %d: training done; rank 0 exports and evaluates", self.global_rank)
            raise SystemExit(0)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process: data_parallel_size = devices × nodes, tensor_parallel_size = 1.

    Checkpoints are single files of full tensors assembled on rank 0 — `torch.load` reads them, as
    after DDP or on one device — and hold only the trainable tensors: the frozen weights are never
    gathered for a checkpoint.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """A copy of `model` with FSDP2 applied: each decoder layer its own group, then the rest (the root).

    The decoder layers are the modules the Hugging Face model names in `_no_split_modules`. The
    original model is left whole (it is where `gather_into` puts the trained weights).
    """
    from torch.distributed.fsdp import fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"FSDP2 here shards over one data-parallel dimension; the mesh has {mesh.ndim}")
    sharded = copy.deepcopy(model)
    base = sharded.get_base_model() if hasattr(sharded, "get_base_model") else sharded
    layer_types = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in sharded.modules() if type(m).__name__ in layer_types]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    # fused NeFT: the optimizer step writes the vectors into the weight shards (SlicedLinear._sync_shard)
    for module in sharded.modules():
        if isinstance(module, SlicedLinear):
            module.sharded = True
    if mesh.get_rank() == 0:
        logger.info("FSDP2: %d decoder layers + root sharded over %d processes", len(layers), mesh.size())
    return sharded


def gather_into(sharded: nn.Module, plain: nn.Module, rank_zero: bool) -> None:
    """Collective: assemble the full weights of `sharded` on rank 0 and load them into `plain` there."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_zero:
        result = plain.load_state_dict(state, strict=False)
        if result.unexpected_keys or set(result.missing_keys) - _tied_names(plain):
            raise RuntimeError(
                f"gathered FSDP state does not fit the model: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )


def _tied_names(model: nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (tied embeddings)."""
    first = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}


def ddp_synchronised(ddp: nn.Module) -> tuple[int, int]:
    """(tensors, values) DDP all-reduces: what its reducer registered, the parameters with requires_grad."""
    try:
        data = ddp._get_ddp_logging_data()  # the reducer's own count
        itemsize = next(p.element_size() for p in ddp.parameters() if p.requires_grad)
        return int(data["num_parameter_tensors"]), int(data["total_parameter_size_bytes"]) // itemsize
    except (AttributeError, KeyError, StopIteration):  # a private API: fall back to DDP's rule
        trainable = [p for p in ddp.parameters() if p.requires_grad]
        return len(trainable), sum(p.numel() for p in trainable)


def check_replicas_agree(model: nn.Module, what: str, values: str = "all") -> int:
    """Collective: raise unless every rank holds the same model; returns the number of tensors compared.

    Compared: each parameter's name, shape and requires_grad; the float64 sum of the parameters
    `values` names ("all", "trainable" or "none"); NeFT's `indices` buffers (which neurons train).
    """
    import torch.distributed as dist

    local: list[tuple[Any, ...]] = []
    for name, param in model.named_parameters():
        summed = values == "all" or (values == "trainable" and param.requires_grad)
        total = float(param.detach().sum(dtype=torch.float64)) if summed else None
        local.append((name, tuple(param.shape), param.requires_grad, total))
    local += [(name, b.tolist()) for name, b in model.named_buffers() if name.endswith("indices")]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    first = everyone[0]  # every rank compares the same lists, so all raise or none does
    differ = sorted({a[0] for other in everyone[1:] for a, b in zip(first, other) if a != b})
    if differ or any(len(other) != len(first) for other in everyone):
        raise RuntimeError(
            f"ranks disagree {what} on {len(differ)} tensors, e.g. {differ[:3]}: a replica diverged, or the "
            "ranks selected different neurons (put paths.cache_dir on a filesystem every node shares, "
            "or pass selection=from_file)"
        )
    return len(local)
