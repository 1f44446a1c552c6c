"""Damaged artifacts, generated: whatever bytes a checkpoint or a neuron-set file ends up holding, loading it
either gives back exactly what was saved or stops with one clear error — never a traceback, never garbage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neft_lab.errors import ConfigError
from neft_lab.training.checkpoints import AtomicCheckpointIO, load_checkpoint

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _damage(data: bytes, how: str, where: float, junk: bytes) -> bytes:
    cut = int(where * len(data))
    if how == "truncate":
        return data[:cut]
    if how == "overwrite":
        return data[:cut] + junk + data[cut + len(junk) :]
    return data[:cut] + junk  # torn write: the start of the file, then garbage


DAMAGES = {
    "how": st.sampled_from(["truncate", "overwrite", "torn"]),
    "where": st.floats(0, 1),
    "junk": st.binary(min_size=1, max_size=64),
}


def _load_damaged(path: Path, data: bytes, damage: tuple, load):
    """Write `data` damaged to `path` and load it: the loaded object, or None after a clean one-line refusal."""
    path.write_bytes(_damage(data, *damage))
    try:
        return load(path)
    except ConfigError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return None


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> tuple[bytes, dict]:
    state = {
        "global_step": 7,
        "state_dict": {"model.w": torch.arange(64.0).reshape(8, 8)},
        "loops": {"x": [1, 2]},
    }
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(state, path)
    return path.read_bytes(), state


@pytest.mark.bad_input
@SETTINGS
@given(**DAMAGES)
def test_a_damaged_checkpoint_loads_exactly_or_fails_cleanly(tmp_path, checkpoint_bytes, how, where, junk):
    data, state = checkpoint_bytes
    loaded = _load_damaged(Path(tmp_path) / "damaged.ckpt", data, (how, where, junk), load_checkpoint)
    if loaded is None:
        return
    # the damage missed everything torch reads (e.g. padding in the zip): then it must be the same checkpoint
    assert loaded["global_step"] == state["global_step"]
    assert torch.equal(loaded["state_dict"]["model.w"], state["state_dict"]["model.w"])


@pytest.fixture(scope="module")
def neuron_set_bytes(tmp_path_factory) -> tuple[bytes, dict]:
    from neft_lab.models.tiny import build_tiny_model
    from neft_lab.neurons.geometry import NeuronSpace
    from neft_lab.neurons.selection import select

    model, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(model)
    scores = {g.name: torch.linspace(-1, 1, g.count) for g in space.groups}
    chosen = select(scores, space, 40 * 64, "cosine", meta={"task": "t"})
    path = chosen.save(tmp_path_factory.mktemp("set") / "neuron_set")
    return path.read_bytes(), {n: i.clone() for n, i in chosen.indices.items()}


@pytest.mark.bad_input
@SETTINGS
@given(**DAMAGES)
def test_a_damaged_neuron_set_loads_exactly_or_fails_cleanly(tmp_path, neuron_set_bytes, how, where, junk):
    from neft_lab.neurons.neuron_set import NeuronSet

    data, indices = neuron_set_bytes
    loaded = _load_damaged(Path(tmp_path) / "damaged.safetensors", data, (how, where, junk), NeuronSet.load)
    if loaded is None:
        return
    # damage that loads touched no index (e.g. only scores): the selection itself is the saved one
    assert loaded.indices.keys() == indices.keys()
    assert all(torch.equal(loaded.indices[n], i) for n, i in indices.items())
