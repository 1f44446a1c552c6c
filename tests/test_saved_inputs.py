"""Issue 19 B7/B8/B11: saved artifacts that are damaged, non-finite or of another shape (NeFT deltas, Lightning
.ckpt files, LoRA adapters, neuron sets, scores files) are refused with one line naming the file and the fix,
never exported, scored or applied silently, and never a traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.integrity import HASH_KEY, content_hash
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons import scores_file
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.neurons.selection import select
from neft_lab.pipeline import run
from neft_lab.strategies import build_strategy
from neft_lab.strategies.base import StrategyContext

COMMON = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"]


def _stage(tmp_path: Path, stage: str, ckpt: Path, *extra: str) -> None:
    out = tmp_path / f"{stage}{len(list(tmp_path.glob(stage + '*')))}"
    overrides = [
        *COMMON,
        f"stage={stage}",
        f"ckpt={ckpt}",
        f"paths.run_dir={out}",
        f"paths.cache_dir={tmp_path}/c",
    ]
    if stage == "export":
        overrides.append(f"export.out={out}")
    run(compose([*overrides, *extra]))


def _refused(tmp_path: Path, ckpt: Path, *fragments: str, stages=("export", "eval"), extra=()) -> None:
    for stage in stages:
        with pytest.raises(ConfigError) as err:
            _stage(tmp_path, stage, ckpt, *extra)
        message = str(err.value)
        assert "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, (stage, message)


# ---- NeFT deltas --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def delta(tmp_path_factory) -> Path:
    """A NeFT delta as the strategy exports it (random selection on the untrained tiny model: no training)."""
    root = tmp_path_factory.mktemp("delta")
    cfg = compose([*COMMON, "strategy=random_neuron"])
    model, tokenizer = build_tiny_model("llama")
    strategy = build_strategy(cfg.strategy)
    model = strategy.apply(model, StrategyContext(cfg=cfg))
    strategy.export(model, tokenizer, root / "export")
    return root / "neft_delta.safetensors"


def _rewrite_delta(source: Path, target: Path, edit, rehash: bool) -> Path:
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
    tensors = edit(load_file(str(source)))
    if rehash:
        meta[HASH_KEY] = content_hash(tensors)
    else:
        meta.pop(HASH_KEY, None)  # a delta written before content hashes
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=meta)
    return target


def test_a_delta_records_its_content_hash(delta):
    with safe_open(str(delta), "pt") as f:
        recorded = f.metadata()[HASH_KEY]
    assert recorded == content_hash(load_file(str(delta)))


@pytest.mark.bad_input
def test_a_delta_with_a_flipped_bit_is_refused(delta, tmp_path):
    damaged = tmp_path / "flipped" / "neft_delta.safetensors"
    damaged.parent.mkdir()
    data = bytearray(delta.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's bytes: safetensors loads it without complaint
    damaged.write_bytes(bytes(data))
    _refused(
        tmp_path, damaged, str(damaged), "is damaged: its content hash", "re-export", extra=["model=tiny"]
    )


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_delta_is_neither_exported_nor_scored(delta, tmp_path, value):
    def poison(tensors):
        key = next(k for k in tensors if k.endswith(".vectors"))
        tensors[key][0, 0] = value
        return tensors

    bad = _rewrite_delta(delta, tmp_path / "nan" / "neft_delta.safetensors", poison, rehash=True)
    _refused(tmp_path, bad, str(bad), "non-finite", extra=["model=tiny"])
    assert not (tmp_path / "export0" / "config.json").exists()


def _extra_key(t):
    t["model.layers.0.mlp.up_proj.bias_of_nothing"] = torch.zeros(1)
    return t


def _axis_5(t):
    key = next(k for k in t if k.endswith(".axis"))
    t[key] = torch.tensor(5)
    return t


def _dotdot(t):
    for suffix in ("indices", "vectors", "axis"):
        t[f"../../etc.{suffix}"] = t.pop(f"model.layers.0.mlp.up_proj.{suffix}")
    return t


def _no_layer(t):
    return {k: v for k, v in t.items() if not k.startswith("model.layers.1.")}


def _no_axis(t):
    return {k: v for k, v in t.items() if k != "model.layers.0.mlp.up_proj.axis"}


def _float_indices(t):
    key = next(k for k in t if k.endswith(".indices"))
    t[key] = t[key].float() + 0.5
    return t


DELTA_DAMAGES = {
    "extra key": (_extra_key, "unexpected key"),
    "axis=5": (_axis_5, "axis 5"),
    "../ in a module name": (_dotdot, "'../../etc'"),
    "no axis": (_no_axis, "lacks ['axis']"),
    "float indices": (_float_indices, "indices"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", list(DELTA_DAMAGES))
def test_a_malformed_delta_is_one_line(delta, tmp_path, damage):
    """Without a content hash (an older delta), the structure itself is checked against the model."""
    edit, fragment = DELTA_DAMAGES[damage]
    bad = _rewrite_delta(delta, tmp_path / "bad" / "neft_delta.safetensors", edit, rehash=False)
    _refused(tmp_path, bad, str(bad), fragment, extra=["model=tiny"])


@pytest.mark.bad_input
def test_a_delta_missing_a_layer_is_refused_by_its_hash(delta, tmp_path):
    bad = tmp_path / "short" / "neft_delta.safetensors"
    with safe_open(str(delta), "pt") as f:
        meta = dict(f.metadata())
    bad.parent.mkdir()
    save_file(_no_layer(load_file(str(delta))), str(bad), metadata=meta)  # the recorded hash kept
    _refused(tmp_path, bad, "is damaged: its content hash", extra=["model=tiny"])


# ---- Lightning .ckpt files ----------------------------------------------------------------------------------
def _neft_state(*overrides: str) -> dict[str, torch.Tensor]:
    """A state_dict of a run with these overrides (every tensor, named `model.<name>` as in a checkpoint)."""
    cfg = compose([*COMMON, "strategy=random_neuron", *overrides])
    tiny = dict(cfg.model.tiny)
    model, _ = build_tiny_model(**tiny)
    model = build_strategy(cfg.strategy).apply(model, StrategyContext(cfg=cfg))
    return {f"model.{k}": v for k, v in model.state_dict().items()}


CKPTS = {
    "no state_dict": (lambda: {"epoch": 0, "global_step": 3}, "has no state_dict"),
    "wrong shapes": (
        lambda: {"state_dict": {"model.model.embed_tokens.weight": torch.zeros(3, 3)}},
        "does not fit",
    ),
    "a 3-layer NeFT checkpoint in a 2-layer run": (
        lambda: {"state_dict": _neft_state("model.tiny.num_layers=3")},
        "does not fit",
    ),
    "state_dict is a list": (lambda: {"state_dict": [1, 2]}, "has no state_dict"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CKPTS))
def test_a_checkpoint_of_another_shape_is_one_line(tmp_path, case):
    make, fragment = CKPTS[case]
    ckpt = tmp_path / "other" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(make(), ckpt)
    _refused(tmp_path, ckpt, str(ckpt), fragment, extra=["model=tiny", "strategy=random_neuron"])


@pytest.mark.bad_input
@pytest.mark.parametrize("other", ["strategy=lora", "model.tiny.num_layers=3"])
def test_resuming_from_a_checkpoint_of_another_run_is_one_line(tmp_path, other):
    """A LoRA or 3-layer `last.ckpt` copied into a 2-layer random-neuron run folder: refused before training,
    naming the checkpoint, instead of Lightning's traceback from load_state_dict."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": _neft_state(other), "global_step": 2, "epoch": 0}, ckpt)
    with pytest.raises(ConfigError) as err:
        run(compose([*COMMON, "model=tiny", "strategy=random_neuron", f"paths.run_dir={run_dir}",
                     f"paths.cache_dir={tmp_path}/c", "eval.before=false"]))  # fmt: skip
    message = str(err.value)
    assert "\n" not in message and str(ckpt) in message and "does not fit" in message, message
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.bad_input
def test_a_non_finite_checkpoint_is_neither_exported_nor_scored(tmp_path):
    state = _neft_state()
    key = "model.model.layers.1.self_attn.q_proj.weight"  # not tied to another tensor, not a NeFT slice
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    ckpt = tmp_path / "nan" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": state}, ckpt)
    _refused(tmp_path, ckpt, "non-finite", extra=["model=tiny", "strategy=random_neuron"])


# ---- LoRA adapters ------------------------------------------------------------------------------------------
def _adapter(folder: Path, *tiny: str) -> Path:
    from peft import LoraConfig, get_peft_model

    cfg = compose(["model=tiny", *tiny])
    model, _ = build_tiny_model(**dict(cfg.model.tiny))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(folder)
    return folder


@pytest.mark.bad_input
def test_a_truncated_lora_adapter_is_one_line(tmp_path):
    folder = _adapter(tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(tmp_path, folder, str(folder), "adapter", stages=("eval",), extra=["model=tiny"])


@pytest.mark.bad_input
def test_a_lora_adapter_of_another_model_is_one_line(tmp_path):
    folder = _adapter(tmp_path / "adapter", "model.tiny.hidden_size=32")
    _refused(tmp_path, folder, str(folder), "does not fit", stages=("eval",), extra=["model=tiny"])


# ---- neuron sets --------------------------------------------------------------------------------------------
def _space() -> NeuronSpace:
    return NeuronSpace.from_model(build_tiny_model("llama")[0])


def _saved_set(tmp_path: Path, vectors: int = 30) -> Path:
    space = _space()
    scores = {g.name: torch.rand(g.count, generator=torch.Generator().manual_seed(0)) for g in space.groups}
    scores[space.groups[0].name] -= 1  # the lowest: a small budget takes them all from the first group
    return select(scores, space, vectors * 64, "cosine").save(tmp_path / "set")


def _rewrite_set(file: Path, edit) -> None:
    """Edit a neuron set's tensors, keeping its header and recording the edited tensors' hash."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["neft_lab"])
    tensors = edit(load_file(str(file)))
    meta[HASH_KEY] = content_hash(tensors)
    save_file(tensors, str(file), metadata={"neft_lab": json.dumps(meta)})


@pytest.mark.bad_input
def test_a_neuron_set_with_a_flipped_bit_is_refused(tmp_path):
    file = _saved_set(tmp_path)
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"set\.safetensors is damaged: its content hash .*re-create it"):
        NeuronSet.load(file)


@pytest.mark.bad_input
def test_a_neuron_set_without_indices_is_refused_up_front(tmp_path):
    file = _saved_set(tmp_path)
    _rewrite_set(file, lambda t: {k: v for k, v in t.items() if not k.startswith("indices.")})
    with pytest.raises(ConfigError, match=r"selects no vectors.*re-create it"):
        NeuronSet.load(file)


def test_empty_groups_of_a_neuron_set_are_dropped(tmp_path):
    """An empty group used to crash NeFT once training had started (attach indexed its last index)."""
    file = _saved_set(tmp_path, vectors=4)
    before = NeuronSet.load(file)
    absent = next(g.name for g in before.space.groups if g.name not in before.indices)

    def add_empty(t):
        t[f"indices.{absent}"] = torch.zeros(0, dtype=torch.long)
        return t

    _rewrite_set(file, add_empty)
    loaded = NeuronSet.load(file)
    assert absent not in loaded.indices and loaded.num_vectors == before.num_vectors


# ---- scores files -------------------------------------------------------------------------------------------
KEY = {"scorer": "cosine", "model": "tiny"}


def _scores(space: NeuronSpace) -> dict[str, torch.Tensor]:
    return {g.name: torch.rand(g.count, generator=torch.Generator().manual_seed(1)) for g in space.groups}


def test_a_scores_file_records_its_content_hash(tmp_path):
    space = _space()
    path = scores_file.save(tmp_path / "s.safetensors", _scores(space), KEY, {})
    values, _ = scores_file.load(path, space=space)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()[HASH_KEY] == content_hash(values)


@pytest.mark.bad_input
def test_nan_scores_are_refused(tmp_path):
    space = _space()
    scores = _scores(space)
    scores[space.groups[1].name][7] = float("nan")
    path = scores_file.save(tmp_path / "s.safetensors", scores, KEY, {})
    with pytest.raises(ConfigError, match=rf"non-finite scores .*{space.groups[1].name}.*stage=score"):
        scores_file.load(path, space=space)


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["3 scores instead of 128", "a group missing", "2-d scores"])
def test_scores_of_another_shape_are_refused_against_the_model(tmp_path, damage):
    space = _space()
    scores = _scores(space)
    name = space.groups[0].name
    if damage.startswith("3"):
        scores[name] = scores[name][:3]
    elif damage.startswith("a group"):
        del scores[name]
    else:
        scores[name] = scores[name].reshape(2, -1)
    path = scores_file.save(tmp_path / "s.safetensors", scores, KEY, {})
    with pytest.raises(
        ConfigError, match=rf"{name}.*this model has {space.groups[0].count}.*stage=score"
    ) as err:
        scores_file.load(path, space=space)
    assert "\n" not in str(err.value)


@pytest.mark.bad_input
def test_a_scores_file_with_a_flipped_bit_is_refused(tmp_path):
    space = _space()
    path = scores_file.save(tmp_path / "s.safetensors", _scores(space), KEY, {})
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"is damaged: its content hash"):
        scores_file.load(path, space=space)


# ---- data files that are not regular files ------------------------------------------------------------------
def _special(folder: Path, kind: str) -> Path:
    import os

    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "train.jsonl"
    if kind == "directory":
        file.mkdir()
    elif kind == "symlink loop":
        file.symlink_to(folder / "train.jsonl")
    elif kind == "FIFO":
        os.mkfifo(file)
    elif kind == "/dev/zero":
        file.symlink_to("/dev/zero")
    elif kind == "deeply nested JSON":
        file.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    return file


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("directory", "is a folder, not a file"),
        ("symlink loop", "symbolic links"),
        ("FIFO", "is not a regular file"),
        ("/dev/zero", "is not a regular file"),
        ("deeply nested JSON", "nested too deeply"),
    ],
)
def test_a_data_file_that_is_not_a_regular_file_is_one_line(tmp_path, kind, fragment):
    """A FIFO blocked forever and /dev/zero filled the memory; a folder or a symlink loop was a traceback."""
    import signal

    from neft_lab.data.sources import read_local_split
    from neft_lab.errors import DataError

    file = _special(tmp_path / "data", kind)

    def hung(*_):
        raise TimeoutError(f"reading {kind} blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(DataError) as err:
            read_local_split(tmp_path / "data", "train", "en", "fr", "source", "target")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    message = str(err.value)
    assert str(file) in message and fragment in message and "\n" not in message, message


# ---- a run folder's config.yaml -------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "text", ["model: [unclosed\n  strategy: {", "- a list\n- not a config\n", "model: tiny\n", "just text\n"]
)
def test_a_garbled_run_config_is_one_line(delta, tmp_path, text):
    import shutil

    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(delta, folder / "neft_delta.safetensors")
    (folder / "config.yaml").write_text(text)
    _refused(tmp_path, folder, str(folder / "config.yaml"), "run config", extra=["model=tiny"])


@pytest.mark.bad_input
def test_a_fifo_given_as_a_data_file_is_refused_up_front(tmp_path):
    import os

    from neft_lab.data.sources import data_file
    from neft_lab.errors import DataError

    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"train.jsonl is not a regular file \(a FIFO\)"):
        data_file(fifo, "task.data.train_file", "instruction records")


@pytest.mark.bad_input
def test_a_bad_scores_file_is_refused_before_any_model_loads(tmp_path):
    from neft_lab.validation import validate

    space = _space()
    scores = _scores(space)
    scores[space.groups[0].name] = scores[space.groups[0].name][:3]
    path = scores_file.save(tmp_path / "s.safetensors", scores, KEY, {})
    cfg = compose(
        [
            *COMMON,
            "strategy=neft",
            f"selection.scores={path}",
            f"paths.run_dir={tmp_path}/r",
            f"paths.cache_dir={tmp_path}/c",
        ]
    )
    with pytest.raises(ConfigError, match=r"holds scores of shape \(3,\), but this model has 128"):
        validate(cfg)
