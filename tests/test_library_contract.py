"""The library's adapter contract, as PEFT tests its tuners: one matrix over the tiny Llama, GPT-2-style and
Gemma-style models × impl fused/delta (`CASES`, PEFT's TEST_CASES). Each case trains a few steps first, so the
vectors differ from the base and a check that compared untrained vectors could not pass by accident."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library_helpers import (
    BUDGET,
    CASES,
    FORBIDDEN,
    IDS,
    INPUT,
    MERGE_TOLERANCE,
    base_model,
    logits,
    same_state,
    selected_mask,
    trained,
)
from neft_lab import NeuronConfig, NeuronModel, get_neuron_model
from neft_lab.neurons import sliced


# ---- the matrix ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "impl"), CASES, ids=IDS)
def test_save_then_load_gives_identical_outputs(arch, impl, tmp_path):
    model = trained(arch, impl)
    expected = logits(model)
    assert not torch.equal(expected, logits(base_model(arch))), (
        "training changed nothing: the case is vacuous"
    )
    model.save_pretrained(tmp_path)
    loaded = NeuronModel.from_pretrained(base_model(arch), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert (
        same_state(loaded.state_dict(), model.state_dict()) == []
    )  # the trained tensors themselves, bit for bit
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT's default: loaded for inference
    again = NeuronModel.from_pretrained(base_model(arch), tmp_path, is_trainable=True)
    assert [n for n, p in again.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


@pytest.mark.parametrize(("arch", "impl"), CASES, ids=IDS)
def test_merge_then_unmerge_restores_the_base_bit_for_bit(arch, impl):
    model, base = trained(arch, impl), base_model(arch)
    adapted = logits(model)
    model.merge()
    merged = logits(model)
    if impl == "fused":  # the live weight already held the vectors: the same numbers, as plain layers
        assert torch.equal(merged, adapted)
    else:  # base + delta rounded once into the weight, where the forward added two products
        assert torch.allclose(merged, adapted, rtol=0, atol=MERGE_TOLERANCE)
    assert same_state(model.hf_model.state_dict(), base.state_dict()) != []  # merged: not the base
    model.unmerge()
    assert torch.equal(logits(model), adapted)
    with model.disable_adapter():  # the layers as they were, with the weights they had before training
        assert same_state(model.hf_model.state_dict(), base.state_dict()) == []
    assert all(isinstance(model.hf_model.get_submodule(m), sliced.SlicedLinear) for m in model._wrappers)


@pytest.mark.parametrize(("arch", "impl"), CASES, ids=IDS)
def test_merging_twice_is_idempotent(arch, impl):
    model = trained(arch, impl)
    model.merge()
    once = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    out = logits(model)
    model.merge()
    assert same_state(model.hf_model.state_dict(), once) == []
    assert torch.equal(logits(model), out)
    plain = model.merge_and_unload()  # merging a merged model once more, as it hands the model back
    assert same_state(plain.state_dict(), once) == []
    assert not any(isinstance(m, sliced.SlicedLinear) for m in plain.modules())


@pytest.mark.parametrize(("arch", "impl"), CASES, ids=IDS)
def test_disable_adapter_gives_exactly_the_base_outputs(arch, impl):
    model, base = trained(arch, impl), base_model(arch)
    expected, adapted = logits(base), logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    assert torch.equal(logits(model), adapted)  # the adapter is back
    model.merge()
    with model.disable_adapter():  # also from the merged state
        assert torch.equal(logits(model), expected)
    assert torch.equal(logits(model), logits(copy.deepcopy(model)))


@pytest.mark.parametrize(("arch", "impl"), CASES, ids=IDS)
def test_a_trainer_step_changes_only_the_selected_vectors(arch, impl, tmp_path):
    """HF Trainer, gradient checkpointing, fused AdamW (the Trainer's default, whose step moves no version
    counter): every tensor but the selected vectors is bit-identical afterwards."""
    from transformers import Trainer, TrainingArguments

    base = base_model(arch)
    model = get_neuron_model(base_model(arch), NeuronConfig(method="random", budget=BUDGET, impl=impl))
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, optim="adamw_torch_fused",
        weight_decay=0.1, gradient_checkpointing=True, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    rows = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in INPUT.repeat(2, 1)
    ]
    Trainer(model=model, args=args, train_dataset=rows).train()
    during = logits(model.eval())
    merged = model.merge_and_unload()
    assert (
        torch.equal(logits(merged), during) or impl == "delta"
    )  # the forward used the latest step's vectors
    before, after = base.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == sorted(f"{m}.weight" for m in model._wrappers)
    for module in model._wrappers:
        mask, key = selected_mask(model, module), f"{module}.weight"
        assert torch.equal(before[key][~mask], after[key][~mask]), f"{key}: an unselected entry moved"
        assert not torch.equal(before[key][mask], after[key][mask]), f"{key}: no selected entry moved"


@pytest.mark.parametrize(("arch", "impl"), CASES, ids=IDS)
def test_the_state_dict_and_the_saved_files_hold_only_the_vectors(arch, impl, tmp_path):
    model = trained(arch, impl)
    selected = model.neuron_set.num_parameters
    state = model.state_dict()
    trained_keys = {k for k in state if not k.endswith(".indices")}
    assert {k.rsplit(".", 1)[1] for k in trained_keys} == {"vectors" if impl == "fused" else "delta"}
    assert sum(state[k].numel() for k in trained_keys) == selected
    assert model.load_state_dict(state, strict=True)  # an adapter state dict loads strictly: nothing missing
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neft_config.json", "neft_delta.safetensors"]
    tensors = load_file(str(tmp_path / "neft_delta.safetensors"))
    values = [k for k in tensors if k.endswith(".vectors")]
    assert sum(tensors[k].numel() for k in values) == selected
    extra = {k.rsplit(".", 1)[1] for k in tensors} - {"indices", "vectors", "axis"}
    assert extra == (set() if impl == "fused" else {"delta"})
    with safe_open(str(tmp_path / "neft_delta.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["base_hash"] == sliced.base_hash(base_model(arch), sliced.delta_modules(tensors))
    config = json.loads((tmp_path / "neft_config.json").read_text())
    assert (config["impl"], config["vectors"], config["base"]["hash"]) == (
        impl,
        model.neuron_set.num_vectors,
        meta["base_hash"],
    )


@pytest.mark.parametrize(("arch", "impl"), CASES, ids=IDS)
def test_dtype_round_trip_bf16_base_float32_masters(arch, impl, tmp_path):
    model = trained(arch, impl, dtype=torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    model.save_pretrained(tmp_path)
    values = load_file(str(tmp_path / "neft_delta.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in values.items() if k.endswith((".vectors", ".delta")))
    loaded = NeuronModel.from_pretrained(base_model(arch, torch.bfloat16), tmp_path)
    assert (
        same_state(loaded.state_dict(), model.state_dict()) == []
    )  # the float32 masters, not rounded to bf16
    masters = {id(p) for w in loaded._wrappers.values() for _, p in w.trainable()}
    assert {p.dtype for p in loaded.parameters() if id(p) in masters} == {torch.float32}
    assert {p.dtype for p in loaded.parameters() if id(p) not in masters} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits(loaded), logits(model))
    merged = loaded.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


# ---- a fresh process ------------------------------------------------------------------------------------------
FRESH = textwrap.dedent(
    """
    import json, sys
    import neft_lab
    assert "torch" not in sys.modules, "import neft_lab imported torch"
    from neft_lab import NeuronConfig, NeuronModel, get_neuron_model, score_neurons, select_neurons
    import torch
    torch.set_num_threads(1)
    from neft_lab.models.tiny import build_tiny_model
    root = sys.argv[1]
    inputs = torch.load(f"{root}/input.pt")
    results = {}
    for case in json.loads(sys.argv[2]):
        arch = case.split("-")[0]
        base = build_tiny_model(arch)[0].eval()
        model = NeuronModel.from_pretrained(base, f"{root}/{case}")
        with torch.no_grad():
            out = model(input_ids=inputs).logits
        results[case] = torch.equal(out, torch.load(f"{root}/{case}.pt"))
    results["forbidden"] = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN})
    print(json.dumps(results))
    """
).replace("{FORBIDDEN}", repr(set(FORBIDDEN)))


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> dict:
    """Every case's adapter saved here and loaded by one fresh Python process."""
    root = tmp_path_factory.mktemp("adapters")
    torch.save(INPUT, root / "input.pt")
    for (arch, impl), case in zip(CASES, IDS):
        model = trained(arch, impl)
        model.save_pretrained(root / case)
        torch.save(logits(model), root / f"{case}.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(root), json.dumps(IDS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", IDS)
def test_a_saved_adapter_loads_in_a_fresh_process(fresh_process, case):
    assert fresh_process[case] is True


def test_the_library_imports_no_hydra_omegaconf_or_lightning(fresh_process):
    """The fresh process imported the public API, built models and loaded six adapters: none of them came in
    (and `import neft_lab` alone did not import torch)."""
    assert fresh_process["forbidden"] == []
