"""A Hugging Face causal LM with only its selected neuron vectors trainable, and the adapter life cycle PEFT users
expect: `save_pretrained`, `NeuronModel.from_pretrained`, `merge_and_unload`, `unmerge`, `disable_adapter`.

    model = get_neuron_model(model, NeuronConfig(neurons=select_neurons(scores, budget=0.09)))
    model.print_trainable_parameters()
    Trainer(model=model, ...).train()            # or TRL's SFTTrainer, or any torch loop
    model.save_pretrained("out")                 # neft_delta.safetensors + neft_config.json: the vectors only
    model = NeuronModel.from_pretrained(base, "out")   # refuses a base whose weights hash differently

The sliced layers are `neft_lab.neurons.sliced` (impl "fused": the selected rows/columns live in the weight and
only their gradient is formed; "delta": a zero-initialised difference added in the forward); the adapter file is
the CLI's `neft_delta.safetensors` (`neft_lab.neurons.delta_file`), so `from_pretrained` also reads a run folder
of `python -m neft_lab strategy=neft` and `stage=eval ckpt=<adapter folder>` reads an adapter.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from neft_lab.errors import ConfigError
from neft_lab.integrity import HASH_KEY, first_non_finite
from neft_lab.io import atomic_write_json
from neft_lab.library.scores import NeuronScores, random_scores, select_neurons
from neft_lab.masters import keep_trainable_in
from neft_lab.neurons import delta_file, sliced
from neft_lab.neurons.geometry import FAMILIES, NeuronSpace, family_of, model_type_of
from neft_lab.neurons.neuron_set import NeuronSet

logger = logging.getLogger(__name__)

CONFIG_FILE = "neft_config.json"
CONFIG_FORMAT = "neft_lab.neuron_adapter/1"
IMPLS = ("fused", "delta")  # `masked` (the authors' dense form) changes unselected entries under weight decay
_FIX = "save it again with NeuronModel.save_pretrained (or re-export the run), or copy an intact one"


@dataclass
class NeuronConfig:
    """What to train: a neuron set (`neurons`: a `NeuronSet` or its .safetensors file), or `scores` and a budget
    (`budget`: 0.09 or "paper_9"; or `vectors`: a count) chosen with `method` ("cosine": most affected first;
    "reverse"; "random", which needs no scores); `target_modules`: the vector kinds (up, down, gate, q, k, v,
    o; default the set's, or up/down); `impl`: "fused" or "delta"; `master_dtype`: "float32" keeps the trained
    vectors in float32 whatever the model's dtype (bf16 enters as autocast), None trains in the model's dtype."""

    neurons: NeuronSet | str | Path | None = None
    scores: NeuronScores | None = None
    budget: float | str | None = None
    vectors: int | None = None
    method: str = "cosine"
    pooling: str = "global"
    seed: int = 0
    target_modules: tuple[str, ...] | None = None
    impl: str = "fused"
    master_dtype: str | None = "float32"
    selection: dict[str, Any] = field(default_factory=dict)  # how the set was chosen (filled in; saved)

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ConfigError(f"NeuronConfig(impl={self.impl!r}): choose one of {IMPLS}")
        if self.master_dtype not in ("float32", None):
            raise ConfigError(
                f"NeuronConfig(master_dtype={self.master_dtype!r}): 'float32' (trained vectors kept in float32) "
                "or None (trained in the model's dtype)"
            )
        if self.target_modules is not None:
            self.target_modules = tuple(
                [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
            )

    def neuron_set(self, model: nn.Module) -> NeuronSet:
        """The set this config names, chosen now when given as scores + budget, checked against `model`."""
        if self.neurons is not None:
            if self.scores is not None or self.budget is not None or self.vectors is not None:
                raise ConfigError("NeuronConfig: give neurons=<set>, or scores= and a budget, not both")
            chosen = self.neurons if isinstance(self.neurons, NeuronSet) else NeuronSet.load(self.neurons)
        else:
            scores = self.scores
            if scores is None:
                if self.method != "random":
                    raise ConfigError(
                        "NeuronConfig needs neurons=<NeuronSet or .safetensors file>, or scores=<score_neurons(...)> "
                        "with budget=..., or method='random' with budget=..."
                    )
                scores = random_scores(model, self.target_modules or ("up", "down"))
            if self.target_modules is not None and tuple(scores.space.kinds) != self.target_modules:
                raise ConfigError(
                    f"NeuronConfig(target_modules={list(self.target_modules)}) but the scores cover "
                    f"{list(scores.space.kinds)}: score the kinds you train (score_neurons(..., modules=...))"
                )
            chosen = select_neurons(
                scores,
                self.budget,
                vectors=self.vectors,
                method=self.method,
                pooling=self.pooling,
                seed=self.seed,
            )
        kinds = tuple(chosen.space.kinds)
        if self.target_modules is not None and set(kinds) - set(self.target_modules):
            raise ConfigError(
                f"the neuron set selects {list(kinds)} vectors, but NeuronConfig(target_modules="
                f"{list(self.target_modules)}) leaves {sorted(set(kinds) - set(self.target_modules))} out"
            )
        chosen.check_same_space(NeuronSpace.from_model(model, kinds))
        return chosen

    def to_dict(self) -> dict[str, Any]:
        """What the adapter's neft_config.json records (the set itself is in the delta file)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("neurons", "scores")}
        out["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return out


class NeuronModel(nn.Module):
    """A causal LM (`hf_model`) whose selected neuron vectors are its only trainable tensors; everything else is
    the model's, forwarded (`config`, `generate`, `gradient_checkpointing_enable`, ...).

    `state_dict()` holds only the trained tensors and their indices (a `Trainer` checkpoint is the vectors;
    `load_state_dict` of one restores them and refuses another selection)."""

    def __init__(self, model: nn.Module, config: NeuronConfig, _base_hash: str | None = None) -> None:
        super().__init__()
        if isinstance(model, NeuronModel) or any(isinstance(m, sliced.SlicedLinear) for m in model.modules()):
            raise ConfigError("this model already has neuron vectors attached: merge_and_unload() it first")
        neuron_set = config.neuron_set(model)
        config.target_modules = tuple(neuron_set.space.kinds)
        config.selection = _jsonable(neuron_set.meta)
        plans = [
            sliced.SlicePlan(neuron_set.space.group(n).module, neuron_set.space.group(n).linear_axis, idx)
            for n, idx in neuron_set.indices.items()
        ]
        modules = [plan.module for plan in plans]
        self._base_parameters = sum(p.numel() for p in model.parameters())
        first = sliced.linear_weight(model.get_submodule(modules[0]))
        hf_config = getattr(model, "config", None)
        self.base_meta = delta_file.base_identity(
            name=model_type_of(hf_config),
            name_or_path=getattr(hf_config, "_name_or_path", None),
            source="transformers",
            dtype=str(first.dtype).removeprefix("torch."),
        )
        # the hash of the weights the vectors replace, before training changes them (fused writes into them)
        self.base_meta["base_hash"] = _base_hash or sliced.base_hash(model, modules)
        sliced.attach(model, plans, config.impl)
        self.hf_model = model
        self._wrappers: dict[str, sliced.SlicedLinear] = {m: model.get_submodule(m) for m in modules}
        for wrapper in self._wrappers.values():
            if wrapper.impl == "fused":  # the live weight will hold the trained vectors: keep the base's own
                _keep_base_slice(wrapper)
        keep_trainable_in(model, torch.float32 if config.master_dtype == "float32" else None)
        self.neuron_config, self.neuron_set = config, neuron_set
        self._merged = self._disabled = self._unloaded = False
        if config.impl == "fused":  # after any optimizer's step, not only those whose step bumps the version
            _sync_after_steps(self)
        self.register_state_dict_post_hook(_adapter_state_only)
        self.register_load_state_dict_pre_hook(_check_adapter_state)
        self.register_load_state_dict_post_hook(_adapter_loaded)

    def __setstate__(self, state: dict[str, Any]) -> None:  # a deep copy or unpickled model syncs as well
        super().__setstate__(state)
        if self.neuron_config.impl == "fused":
            _sync_after_steps(self)

    # ---- a model like the wrapped one ----------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("hf_model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["hf_model"], name)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):  # noqa: ANN001 - HF's own
        """The wrapped model's forward (its arguments, so `Trainer` keeps the dataset's columns)."""
        if self._unloaded:
            raise RuntimeError("merge_and_unload() handed the model back: use the model it returned")
        return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped Hugging Face model (its neuron-sliced layers in place)."""
        return self.hf_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters: the selected vectors, all parameters of the base model)."""
        trainable = sum(
            p.numel() for w in self._wrappers.values() for _, p in w.trainable() if p.requires_grad
        )
        return trainable, self._base_parameters

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        kinds = "/".join(self.neuron_set.space.kinds)
        print(  # noqa: T201 - PEFT's method prints
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
            f" (NeFT neuron vectors: {self.neuron_set.num_vectors:,} of {self.neuron_set.space.num_vectors:,} "
            f"{kinds} vectors, impl={self.neuron_config.impl})"
        )

    # ---- merging and the base's own outputs -----------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained vectors into the weights and put the plain layers back (outputs as before; a delta
        impl's base + delta is now rounded once to the weight's dtype). Merging again is a no-op."""
        self._check_usable("merge")
        if self._merged:
            logger.info("the neuron vectors are already merged: nothing to do")
            return
        for wrapper in self._wrappers.values():
            _keep_base_slice(wrapper)  # delta: the weight is still the base's
        sliced.merge(self.hf_model)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: the base's weights come back bit for bit (from the copy kept of them) and the trained
        vectors train on. A no-op when not merged."""
        self._check_usable("unmerge")
        if not self._merged:
            return
        for name, wrapper in self._wrappers.items():
            weight = sliced.linear_weight(wrapper.base)
            wrapper.to(weight.device)  # moved while merged (out of the module tree)
            weight.index_copy_(wrapper.axis, wrapper.indices, wrapper.base_slice.to(weight.dtype))
            self.hf_model.set_submodule(name, wrapper)
            wrapper.sync()  # fused: the trained vectors into the live weight again
        self._merged = False

    @torch.no_grad()
    def quantize_base(self, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None) -> int:
        """Store the frozen base in 4 bits (bitsandbytes `Linear4bit`, `neurons/quantized.py`): QLoRA's base under
        NeFT's float32 vectors; returns how many linear layers. The weights are quantized as the base had them
        (fused layers' selected slices restored from the kept copy first), so an adapter reloaded with
        `from_pretrained` and then quantized is the model it was trained as. Afterwards nothing is written into
        the weights: merge, unmerge and disable_adapter are refused."""
        from neft_lab.neurons.quantized import quantize_frozen_linears

        self._check_usable("quantize")
        if self._merged:
            raise ConfigError("quantize_base() on a merged model: unmerge() first")
        dtype = compute_dtype or next(p.dtype for p in self.hf_model.parameters() if not p.requires_grad)
        for wrapper in self._wrappers.values():
            if (
                "base_slice" in wrapper._buffers and not wrapper.quantized
            ):  # fused: the base's own values back
                weight = sliced.linear_weight(wrapper.base)
                weight.index_copy_(wrapper.axis, wrapper.indices, wrapper.base_slice.to(weight.dtype))
        self._quantized = True
        return quantize_frozen_linears(self.hf_model, quant_type, dtype)

    def merge_and_unload(self) -> nn.Module:
        """The plain Hugging Face model with the trained vectors in its weights (`save_pretrained` writes a normal
        checkpoint). This wrapper is done afterwards."""
        self.merge()
        self._unloaded = True
        return self.hf_model

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside, the model is the base model exactly: its own layers and weights (bit for bit)."""
        self._check_usable("disable_adapter")
        if self._disabled:  # nested
            yield
            return
        was_merged = self._merged
        self.unmerge()
        with torch.no_grad():
            for name, wrapper in self._wrappers.items():
                if wrapper.impl == "fused":
                    weight = sliced.linear_weight(wrapper.base)
                    weight.index_copy_(wrapper.axis, wrapper.indices, wrapper.base_slice.to(weight.dtype))
                self.hf_model.set_submodule(name, wrapper.base)
        self._disabled = True
        try:
            yield
        finally:
            with torch.no_grad():
                for name, wrapper in self._wrappers.items():
                    self.hf_model.set_submodule(name, wrapper)
                    wrapper.sync()
            self._disabled = False
            if was_merged:
                self.merge()

    # ---- files ----------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors as the delta file holds them: per sliced weight its indices, trained values
        (`vectors`), axis and, for impl=delta, the trained difference (`delta`)."""
        self._check_usable("save")
        if self._disabled:
            raise ConfigError("cannot save inside disable_adapter(): save after the with-block")
        was_merged = self._merged
        self.unmerge()
        try:
            tensors = sliced.delta_state(self.hf_model)
            for name, wrapper in self._wrappers.items():
                if wrapper.impl == "delta":
                    tensors[f"{name}.delta"] = wrapper.delta.detach().cpu().clone()
        finally:
            if was_merged:
                self.merge()
        return tensors

    def save_pretrained(self, save_directory: str | Path, **_ignored: Any) -> Path:
        """Write `neft_delta.safetensors` (the selected vectors, their indices, the base's identity and hash: the
        CLI's delta format) and `neft_config.json` into `save_directory`, each atomically; nothing else."""
        folder = Path(save_directory)
        tensors = self.adapter_state()
        meta = {**self.base_meta, "strategy": "neft"}
        path = delta_file.write(folder / delta_file.FILE, tensors, meta)
        header = delta_file.read_header(path)
        record = {
            "format": CONFIG_FORMAT,
            "delta_file": delta_file.FILE,
            "delta_sha256": header[HASH_KEY],
            "model_type": self.neuron_set.space.model_type,
            "base": {k.removeprefix("base_"): v for k, v in self.base_meta.items()},
            **self.neuron_config.to_dict(),
            "vectors": self.neuron_set.num_vectors,
            "parameters": self.neuron_set.num_parameters,
            "per_layer": self.neuron_set.per_layer(),
        }
        atomic_write_json(folder / CONFIG_FILE, record)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | Path,
        *,
        is_trainable: bool = False,
        impl: str | None = None,
        master_dtype: Any = ...,
    ) -> NeuronModel:
        """`model` (the base the adapter was trained on) with the adapter at `path` attached: a folder written
        by `save_pretrained`, a run folder of `python -m neft_lab strategy=neft` (its neft_delta.safetensors and
        neuron_set.safetensors) or a neft_delta.safetensors file. Another base (its weights hash differently) is
        refused. `is_trainable=False` (PEFT's default) freezes the vectors; `impl` / `master_dtype` default to
        the saved ones (a CLI run: fused, float32). A Hugging Face Trainer checkpoint folder (`checkpoint-N/`,
        whose `model.safetensors` is this class's state dict: vectors and indices) loads too; it records no base
        hash, so the base is checked by shape only."""
        checkpoint = _trainer_checkpoint(Path(path))
        if checkpoint is not None:
            return cls._from_trainer_checkpoint(model, checkpoint, is_trainable, impl, master_dtype)
        delta_path, folder = _delta_path(Path(path))
        tensors, meta = delta_file.read(delta_path, _FIX)
        saved = _saved_config(folder, delta_path, meta)
        bad = first_non_finite(tensors.items())
        if bad is not None:
            raise ConfigError(f"{delta_path} holds non-finite values ({bad[1]} NaN/inf in {bad[0]}): {_FIX}")
        if isinstance(model, NeuronModel):
            raise ConfigError("from_pretrained takes the base model, not a NeuronModel")
        try:
            sliced.check_delta(model, tensors)
        except ValueError as err:
            raise ConfigError(f"{delta_path} does not fit this {type(model).__name__}: {err}") from None
        label = f"this {type(model).__name__} ({getattr(getattr(model, 'config', None), '_name_or_path', '') or 'no name'})"
        if not delta_file.check_base(model, tensors, meta, delta_path, label):
            logger.warning(
                "%s records no base model hash (an older delta): loaded without checking the base", delta_path
            )
        neuron_set = _neuron_set_of(model, tensors, saved, folder)
        config = NeuronConfig(
            neurons=neuron_set,
            impl=impl or saved.get("impl", "fused"),
            master_dtype=saved.get("master_dtype", "float32") if master_dtype is ... else master_dtype,
        )
        wrapped = cls(model, config, _base_hash=meta.get("base_hash") or None)
        wrapped._load_values(tensors)
        if not is_trainable:
            for wrapper in wrapped._wrappers.values():
                for _, param in wrapper.trainable():
                    param.requires_grad_(False)
        return wrapped

    @classmethod
    def _from_trainer_checkpoint(
        cls, model: nn.Module, file: Path, is_trainable: bool, impl: str | None, master_dtype: Any
    ) -> NeuronModel:
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as err:  # noqa: BLE001 - truncated or not safetensors
            raise ConfigError(
                f"{file} is not a readable safetensors file ({type(err).__name__}): {_FIX}"
            ) from None
        prefix = "hf_model."
        modules = sorted(
            k[len(prefix) : -len(".indices")]
            for k in state
            if k.startswith(prefix) and k.endswith(".indices")
        )
        saved_impls = {k.rsplit(".", 1)[1] for k in state if k.endswith((".vectors", ".delta"))}
        if not modules or len(saved_impls) != 1:
            raise ConfigError(
                f"{file} is not a Trainer checkpoint of a NeuronModel (no hf_model.<module>.indices with its "
                f"vectors or delta): give the checkpoint folder of a Trainer that trained get_neuron_model's model"
            )
        if isinstance(model, NeuronModel):
            raise ConfigError("from_pretrained takes the base model, not a NeuronModel")
        every = NeuronSpace.from_model(model, tuple(FAMILIES[family_of(model_type_of(model.config))]))
        axis_of = {g.module: g.linear_axis for g in every.groups}
        unknown = [m for m in modules if m not in axis_of]
        if unknown:
            raise ConfigError(
                f"{file} slices {unknown[0]}, which this {type(model).__name__} has no neuron vectors in"
            )
        layout = {f"{m}.indices": state[f"{prefix}{m}.indices"] for m in modules}
        layout |= {f"{m}.axis": torch.tensor(axis_of[m]) for m in modules}
        neuron_set = _neuron_set_of(model, layout, {}, file.parent)
        saved_impl = "fused" if saved_impls == {"vectors"} else "delta"
        if impl not in (None, saved_impl):
            raise ConfigError(
                f"{file} was trained with impl={saved_impl}: load it with impl={saved_impl} (or None)"
            )
        dtype = "float32" if master_dtype is ... else master_dtype
        wrapped = cls(model, NeuronConfig(neurons=neuron_set, impl=saved_impl, master_dtype=dtype))
        wrapped.load_state_dict({k: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        if not is_trainable:
            for wrapper in wrapped._wrappers.values():
                for _, param in wrapper.trainable():
                    param.requires_grad_(False)
        return wrapped

    @torch.no_grad()
    def _load_values(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, wrapper in self._wrappers.items():
            values = tensors[f"{name}.vectors"]
            if wrapper.impl == "fused":
                wrapper.vectors.copy_(values)
                wrapper.sync()
                continue
            raw = tensors.get(f"{name}.delta")
            if raw is not None and tuple(raw.shape) == tuple(wrapper.delta.shape):
                wrapper.delta.copy_(raw)
            else:  # a fused or CLI delta: the difference to the base, in float32 (not bit for bit)
                base = sliced.linear_weight(wrapper.base).index_select(wrapper.axis, wrapper.indices)
                wrapper.delta.copy_(values.to(base.device, torch.float32) - base.float())

    def _check_usable(self, what: str) -> None:
        if getattr(self, "_quantized", False) and what in ("merge", "unmerge", "disable_adapter"):
            raise ConfigError(
                f"cannot {what} on a 4-bit base (quantize_base): save_pretrained the adapter instead"
            )
        if self._unloaded:
            raise ConfigError(f"cannot {what}: merge_and_unload() handed the model back; wrap it again")


def get_neuron_model(model: nn.Module, config: NeuronConfig | None = None, **kwargs: Any) -> NeuronModel:
    """`model` with only the neuron vectors `config` selects trainable (`NeuronConfig(**kwargs)` when no config)."""
    if config is None:
        config = NeuronConfig(**kwargs)
    elif kwargs:
        raise TypeError("get_neuron_model: pass a NeuronConfig or its fields as keywords, not both")
    return NeuronModel(model, config)


# ---- helpers --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _keep_base_slice(wrapper: sliced.SlicedLinear) -> None:
    """A copy of the base's values of the selected slice (the weight's dtype), kept beside the wrapper."""
    if "base_slice" not in wrapper._buffers:
        base = sliced.linear_weight(wrapper.base).index_select(wrapper.axis, wrapper.indices).clone()
        wrapper.register_buffer("base_slice", base, persistent=False)


def _sync_after_steps(model: NeuronModel) -> None:
    """Write the fused vectors into the live weights after every optimizer step that updates them.

    The fused layers also sync lazily when a vector's version counter moved, but fused AdamW (`fused=True`,
    the Trainer's default `adamw_torch_fused`) updates in place without moving it: their forward would use
    the weights of a step ago. The hook holds the model weakly and goes with it."""
    ref = weakref.ref(model)
    ids = {id(p) for w in model._wrappers.values() for _, p in w.trainable()}

    def hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        owner = ref()
        if owner is not None and any(id(p) in ids for g in optimizer.param_groups for p in g["params"]):
            sliced.sync(owner.hf_model)  # the wrappers in the module tree (not while disabled or merged)

    handle = register_optimizer_step_post_hook(hook)
    weakref.finalize(model, handle.remove)


def _adapter_keys(module: NeuronModel) -> dict[str, torch.Tensor]:
    keys = {}
    for name, wrapper in module._wrappers.items():
        for pname, param in wrapper.trainable():
            keys[f"hf_model.{name}.{pname}"] = param
        keys[f"hf_model.{name}.indices"] = wrapper.indices
    return keys


def _adapter_state_only(module: NeuronModel, state_dict: dict, prefix: str, _meta: Any) -> None:
    """state_dict post-hook: keep only the trained tensors and their indices."""
    keys = _adapter_keys(module)
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in keys]:
        del state_dict[key]
    for key, tensor in keys.items():  # merged or disabled: the wrappers are out of the module tree
        state_dict.setdefault(prefix + key, tensor.detach())


def _check_adapter_state(module: NeuronModel, state_dict: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: the checkpoint must be of this neuron set."""
    if module._merged or module._disabled:
        raise ConfigError("load_state_dict while merged or inside disable_adapter(): unmerge() first")
    module._load_prefix = prefix
    for key, tensor in _adapter_keys(module).items():
        theirs = state_dict.get(prefix + key) if key.endswith(".indices") else None
        if theirs is not None and not torch.equal(theirs.cpu(), tensor.cpu()):
            raise ConfigError(
                f"the checkpoint selects other neuron vectors in {key.removesuffix('.indices')}: it was trained "
                "with another neuron set (load it onto a NeuronModel of that set)"
            )


def _adapter_loaded(module: NeuronModel, incompatible: Any) -> None:
    """load_state_dict post-hook: the frozen base is not in an adapter state dict, so not missing."""
    prefix = getattr(module, "_load_prefix", "")
    keys = {prefix + k for k in _adapter_keys(module)}
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys if k in keys or not k.startswith(prefix + "hf_model.")
    ]
    sliced.sync(module.hf_model)


# what a Hugging Face Trainer writes for a model that is no PreTrainedModel: its state dict
TRAINER_WEIGHTS = "model.safetensors"


def _trainer_checkpoint(path: Path) -> Path | None:
    """`model.safetensors` of a Trainer checkpoint folder (no delta beside it), else None."""
    if path.is_dir() and not (path / delta_file.FILE).exists() and (path / TRAINER_WEIGHTS).is_file():
        return path / TRAINER_WEIGHTS
    return None


def _delta_path(path: Path) -> tuple[Path, Path]:
    if path.is_file():
        return path, path.parent
    if (path / delta_file.FILE).is_file():
        return path / delta_file.FILE, path
    if (path / "adapter_config.json").exists():
        raise ConfigError(
            f"{path} is a PEFT adapter (adapter_config.json): load it with peft.PeftModel.from_pretrained"
        )
    raise ConfigError(
        f"{path} holds no {delta_file.FILE}: give a folder written by NeuronModel.save_pretrained, a run folder "
        "of `python -m neft_lab strategy=neft` or the delta file itself"
    )


def _saved_config(folder: Path, delta_path: Path, meta: dict[str, str]) -> dict[str, Any]:
    """neft_config.json beside the delta (absent in a CLI run folder: {}), checked to be this delta's."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        saved = json.loads(file.read_text())
        if not isinstance(saved, dict) or saved.get("format") != CONFIG_FORMAT:
            raise ValueError(f"format {saved.get('format') if isinstance(saved, dict) else None!r}")
    except ValueError as err:
        raise ConfigError(f"{file} is not a neft_lab adapter config ({err}): {_FIX}") from None
    if saved.get("delta_file") == delta_path.name and saved.get("delta_sha256") != meta.get(HASH_KEY):
        raise ConfigError(
            f"{file} describes another {delta_path.name} (delta hash {str(saved.get('delta_sha256'))[:16]}, the file "
            f"has {str(meta.get(HASH_KEY))[:16]}): the two are from different saves; {_FIX}"
        )
    return saved


def _neuron_set_of(
    model: nn.Module, tensors: dict[str, torch.Tensor], saved: dict, folder: Path
) -> NeuronSet:
    """The neuron set a delta trains, as vector groups of `model` (with the run folder's neuron_set meta)."""
    model_type = model_type_of(model.config)
    every = NeuronSpace.from_model(model, tuple(FAMILIES[family_of(model_type)]))
    by_module = {g.module: g for g in every.groups}
    groups = {}
    for module in sorted(k.removesuffix(".indices") for k in tensors if k.endswith(".indices")):
        group = by_module.get(module)
        axis = int(tensors[f"{module}.axis"])
        if group is None or group.linear_axis != axis:
            raise ConfigError(
                f"the delta changes {'columns' if axis else 'rows'} of {module}, which are not neuron vectors of "
                f"this {model_type} model: it is not a NeFT delta of this architecture"
            )
        groups[group.name] = (group, tensors[f"{module}.indices"])
    order = list(FAMILIES[family_of(model_type)])
    kinds = sorted({g.kind for g, _ in groups.values()}, key=order.index)
    space = NeuronSpace.from_model(model, kinds)
    indices = {name: idx for name, (_, idx) in groups.items()}
    meta = dict(saved.get("selection") or {})
    cli_set = folder / "neuron_set.safetensors"
    if not saved and cli_set.is_file():  # a CLI run folder: the set it trained, with how it was chosen
        recorded = NeuronSet.load(cli_set)
        same = recorded.indices.keys() == indices.keys() and all(
            torch.equal(recorded.indices[k], indices[k].long()) for k in indices
        )
        if not same:
            raise ConfigError(
                f"{cli_set} selects other vectors than {folder / delta_file.FILE}: the run folder is mixed"
            )
        meta = dict(recorded.meta)
    return NeuronSet(space, indices, {}, meta)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
