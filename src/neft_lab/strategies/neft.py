"""NeFT: only the selected neuron vectors train (`random_neuron` and `reverse_selection` are the same
strategy with another selection). The neuron set is chosen by `neft_lab.selection_workflow` from a
neuron-set file or from the scores the pipeline's selection stages made (`neft_lab.chain`: this
strategy never starts a run); the sliced layers that make only those vectors parameters come from
`neft_lab.neurons.sliced`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from neft_lab.errors import ConfigError
from neft_lab.io import atomic_dir
from neft_lab.models.loading import parameter_count
from neft_lab.neurons import delta_file, sliced
from neft_lab.neurons.dense_norm import DenseGradNorm
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.ranks import launched_as_rank_zero
from neft_lab.selection_workflow import build_neuron_set, check_selection
from neft_lab.strategies.base import GradNormProbe, StrategyContext, TrainingStrategy
from neft_lab.training.distributed import uses_fsdp2

logger = logging.getLogger(__name__)


class NeftStrategy(TrainingStrategy):
    def __init__(
        self, name: str = "neft", impl: str = "fused", export_merged: bool = False, export_delta: bool = True
    ) -> None:
        if impl not in sliced.IMPLS:
            raise ConfigError(f"unknown strategy.impl '{impl}': choose one of {sliced.IMPLS}")
        self.name, self.impl = name, impl
        self.export_merged, self.export_delta = export_merged, export_delta
        self.neuron_set: NeuronSet | None = None
        self.base_meta: dict[str, str] = {}  # the base model's identity and hash, written into the delta
        self.selection_settings: dict[str, Any] = {}  # what defines the method (metrics.json, stage=report)

    def check_config(self, cfg: Any) -> None:
        """A selection that can run (method, files, budget, reference settings) and an impl the trainer allows."""
        if cfg is None or cfg.selection.name == "none":
            raise ConfigError(
                f"strategy={self.name} needs a neuron selection: e.g. selection=cosine or "
                "selection=from_file selection.file=<set>.safetensors"
            )
        if self.impl == "masked" and uses_fsdp2(cfg.get("trainer")):
            raise ConfigError(
                "strategy.impl=masked cannot train under trainer=fsdp: it trains the whole dense up/down weights "
                "with a gradient mask (the authors' form, kept for benchmarks). Use strategy.impl=fused or delta "
                "with trainer=fsdp, or trainer=ddp"
            )
        quantized = (cfg.get("model") or {}).get("quantization")
        if quantized and (self.impl == "masked" or self.export_merged):
            what = (
                "strategy.impl=masked trains the dense base weights"
                if self.impl == "masked"
                else ("strategy.export_merged=true merges into the weights")
            )
            raise ConfigError(
                f"{what}, which model.quantization={quantized} stores in 4 bits: use strategy.impl=fused or delta "
                "and export the delta (merge it into the unquantized base with stage=export)"
            )
        check_selection(cfg)
        if str((cfg.get("optim") or {}).get("clip_scope", "selected")) == "paper":
            _check_paper_clipping(cfg.get("trainer") or {})

    uses_selection = True  # the pipeline runs the selection stages (reference, score) before `prepare`

    def prepare(self, ctx: StrategyContext) -> None:
        self.check_config(ctx.cfg)

    def apply(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        total = parameter_count(model)
        if "neuron_set_file" in ctx.extras:
            neuron_set = NeuronSet.load(ctx.extras["neuron_set_file"])
            neuron_set.check_same_space(NeuronSpace.from_model(model, neuron_set.space.kinds))
        else:
            neuron_set = build_neuron_set(ctx.cfg, model, total, ctx.extras.get("scores_file"))
        if ctx.run_dir is not None and launched_as_rank_zero():  # every rank selects the same set
            neuron_set.save(Path(ctx.run_dir) / "neuron_set")
        summary = neuron_set.summary(total)
        self.selection_settings = selection_settings(neuron_set, ctx.cfg)
        logger.info(
            "neuron set (%s): %s vectors, %s parameters = %.3f%% of all parameters, %.1f%% of the %s vectors",
            _describe(self.selection_settings),
            f"{summary['vectors']:,}",
            f"{summary['parameters']:,}",
            100 * summary["share_of_all_parameters"],
            100 * summary["share_of_mlp_vectors"],
            "/".join(neuron_set.space.kinds),
        )
        plans = [
            sliced.SlicePlan(
                neuron_set.space.group(name).module, neuron_set.space.group(name).linear_axis, idx
            )
            for name, idx in neuron_set.indices.items()
        ]
        self.base_meta = base_identity(ctx.cfg.get("model") if ctx.cfg is not None else None)
        # the hash of the base weights the delta will touch: taken here, before training changes them
        self.base_meta["base_hash"] = sliced.base_hash(model, [plan.module for plan in plans])
        sliced.attach(model, plans, self.impl)
        self.neuron_set = neuron_set
        return model

    def clip_norm_probe(self, model: nn.Module, scope: str) -> GradNormProbe | None:
        """`paper`: the authors set requires_grad on every weight of the selected kinds and clip on the norm of
        all of them; `DenseGradNorm` forms that dense norm from activations (only the slices train here)."""
        if scope != "paper" or self.neuron_set is None:
            return None
        return DenseGradNorm(model, [g.module for g in self.neuron_set.space.groups])

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Every slice is a weight matrix's rows/columns: all of it decays."""
        return [
            {"params": [p for _, p in self.trainable_named_parameters(model)], "weight_decay": weight_decay}
        ]

    def sync(self, model: nn.Module) -> None:
        sliced.sync(model)

    def summary(self, model: nn.Module, base_parameters: int) -> dict[str, Any]:
        out = super().summary(model, base_parameters)
        if self.neuron_set is not None:
            out.update(
                impl=self.impl,
                selection=selection_label(self.selection_settings),
                selection_settings=self.selection_settings,
                neuron_vectors=self.neuron_set.num_vectors,
                neuron_parameters=self.neuron_set.num_parameters,
                neuron_percent=100 * self.neuron_set.num_parameters / max(base_parameters, 1),
                share_of_mlp_vectors=self.neuron_set.num_vectors / self.neuron_set.space.num_vectors,
            )
        return out

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """The compact delta (indices + trained vectors, the base model's identity and hash) beside the run;
        with `export_merged`, also the merged HF checkpoint in `out_dir` (else `stage=export` writes it later)."""
        sliced.sync(model)
        if self.export_delta:  # the format `NeuronModel.save_pretrained` writes (neurons/delta_file.py)
            meta = {"strategy": self.name, **self.base_meta}
            delta_file.write(out_dir.parent / delta_file.FILE, sliced.delta_state(model), meta)
        if self.export_merged:
            sliced.merge(model)  # the model keeps evaluating identically, now as plain layers
            with atomic_dir(out_dir) as tmp_dir:
                model.save_pretrained(tmp_dir, safe_serialization=True)
                tokenizer.save_pretrained(tmp_dir)
        return out_dir


def selection_settings(neuron_set: NeuronSet, cfg: Any = None) -> dict[str, Any]:
    """Every selection setting that makes one NeFT method differ from another (metrics.json's
    `selection_settings`; `stage=report` keeps runs that differ in any of them in separate rows): the scorer,
    the method, the budget, the pooling, the neuron kinds, and the reference run's K and horizon (reference
    scorers only). From the neuron set's own record, so a set read from a file reports how it was made."""
    meta = neuron_set.meta
    method = meta.get("method")
    budget = meta.get("budget") if isinstance(meta.get("budget"), dict) else {}
    reverse = None
    if method == "cosine_plus_reverse" and cfg is not None:
        reverse = OmegaConf.select(cfg, "selection.reverse_share", default=None)
    return {
        "scorer": None if method == "random" else meta.get("scorer"),
        "method": method,
        "budget_kind": budget.get("kind"),
        "budget_value": budget.get("value"),
        "pooling": meta.get("pooling"),
        "modules": list(neuron_set.space.kinds),
        "reference_steps": meta.get("reference_steps"),
        "reference_horizon": meta.get("reference_horizon"),
        "reverse_share": reverse,
    }


def selection_label(settings: dict[str, Any]) -> str | None:
    """metrics.json's `selection`: the method for the paper's cosine scorer (cosine, reverse, random, ...), the
    scorer for another scorer's most affected vectors (gradient, lora_reference, probe, activation_ridge), both
    otherwise (gradient_reverse, gradient_plus_reverse)."""
    method, scorer = settings.get("method"), settings.get("scorer")
    if scorer in (None, "cosine") or method in ("random", "from_file", "union"):
        return method
    if method == "cosine":
        return scorer
    return f"{scorer}_{method.removeprefix('cosine_')}"


def _describe(settings: dict[str, Any]) -> str:
    label = selection_label(settings)
    scorer = settings.get("scorer")
    return f"{label}, scorer {scorer}" if scorer and scorer != label else str(label)


def base_identity(model_cfg: Any) -> dict[str, str]:
    """The model config's name, name_or_path, source and dtype (safetensors metadata: strings only)."""
    keys = delta_file.IDENTITY_KEYS
    return delta_file.base_identity(**{k: None if model_cfg is None else model_cfg.get(k) for k in keys})


def _check_paper_clipping(trainer: Any) -> None:
    """`optim.clip_scope=paper` forms the authors' dense norm from one backward on one process (DenseGradNorm);
    refuse, before any process is launched, what would make it another norm."""
    devices = trainer.get("devices", 1)
    one_device = str(devices) == "1" or (not isinstance(devices, (int, str)) and len(list(devices)) == 1)
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    if one_device and int(trainer.get("num_nodes") or 1) == 1 and accumulate == 1:
        return
    raise ConfigError(
        f"optim.clip_scope=paper needs one process and no gradient accumulation (trainer.devices={devices}, "
        f"trainer.accumulate_grad_batches={accumulate}): gradients summed over ranks or batches have another "
        "dense norm than per-backward activations give. Set trainer.devices=1 and raise loader.batch_size, "
        "or use optim.clip_scope=selected"
    )
