"""NeFT on a 4-bit frozen base (issue 21 §2): bitsandbytes NF4 linears under float32 vectors, on the CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import read_metrics
from library_helpers import INPUT, base_model
from neft_lab import NeuronConfig, get_neuron_model
from neft_lab.errors import ConfigError
from neft_lab.neurons import sliced

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit base needs bitsandbytes (the dev extra)")
from neft_lab.neurons.quantized import is_quantized, quantize_frozen_linears  # noqa: E402


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def _four_bit_neft(impl: str):
    model = get_neuron_model(
        base_model("llama"), NeuronConfig(method="random", budget=0.05, impl=impl, seed=0)
    )
    count = quantize_frozen_linears(model.hf_model)
    return model, count


@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_a_four_bit_base_trains_only_the_selected_vectors(impl):
    model, count = _four_bit_neft(impl)
    layers = model.hf_model.model.layers
    assert count == 7 * len(layers)  # q, k, v, o, gate, up, down of every layer (not the LM head)
    assert all(is_quantized(m.base) for _, m in sliced._wrappers(model.hf_model))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen |= {n: b.detach().clone() for n, b in model.named_buffers()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=INPUT, labels=INPUT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(model.named_parameters()) | dict(model.named_buffers())
    changed = [n for n, before in frozen.items() if not torch.equal(before, after[n])]
    assert changed == []  # the 4-bit weights (and everything else frozen) bit-identical


@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_the_four_bit_model_is_the_dequantized_base_with_the_trained_slices(impl):
    """What the 4-bit model computes: every frozen linear at its dequantized NF4 weight, the selected vectors
    at their trained values; and that is not the unquantized model (the base really is 4-bit)."""
    from neft_lab.neurons.quantized import dequantized_weight

    model, _ = _four_bit_neft(impl)
    with torch.no_grad():
        for _, param in sliced.trainable_slices(model.hf_model):
            param.add_(0.05)
    expected = base_model("llama")
    with torch.no_grad():
        for name, module in model.hf_model.named_modules():
            base = module.base if isinstance(module, sliced.SlicedLinear) else module
            if is_quantized(base) and not name.endswith(".base"):
                expected.get_submodule(name).weight.copy_(dequantized_weight(base))
    sliced.apply_delta(expected, sliced.delta_state(model.hf_model))
    torch.testing.assert_close(_logits(model), _logits(expected), atol=1e-4, rtol=1e-4)
    error = (_logits(expected) - _logits(base_model("llama"))).abs().mean() / _logits(expected).abs().mean()
    assert error > 0.01  # NF4 moves a random tiny model's logits by tens of percent: it is quantized


@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_the_delta_of_a_four_bit_run_applies_to_the_unquantized_base(impl):
    model, _ = _four_bit_neft(impl)
    with torch.no_grad():
        for _, param in sliced.trainable_slices(model.hf_model):
            param.add_(0.05)
    delta = sliced.delta_state(model.hf_model)
    plain = base_model("llama")
    sliced.apply_delta(plain, delta)
    for key in [k for k in delta if k.endswith(".indices")]:
        module = key.removesuffix(".indices")
        axis = int(delta[f"{module}.axis"])
        weight = plain.get_submodule(module).weight.index_select(axis, delta[key])
        torch.testing.assert_close(weight, delta[f"{module}.vectors"].to(weight.dtype))
    error = (_logits(model) - _logits(plain)).abs().mean() / _logits(plain).abs().mean()
    assert error < 0.5, error  # the same trained model, up to the base's quantization (NF4 on random weights)


def test_a_four_bit_base_cannot_be_merged_into():
    model, _ = _four_bit_neft("fused")
    with pytest.raises(ValueError, match="cannot merge into a 4-bit weight"):
        sliced.merge(model.hf_model)


# ---- model.quantization in the framework ------------------------------------------------------------------------
SHORT = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "task.data.embedded.n_train=48",
    "eval.before=false",
]


@pytest.mark.parametrize("strategy", [["strategy=neft", "selection.reference.steps=4"], ["strategy=lora"]])
def test_neft_and_lora_train_on_a_four_bit_base(tiny_overrides, tmp_path, strategy, caplog):
    from neft_lab.config import compose
    from neft_lab.pipeline import run

    caplog.set_level("INFO")
    run(compose([*tiny_overrides, *SHORT, *strategy, "model.quantization=nf4"]))
    assert "model.quantization=nf4: 14 frozen linear layers stored in 4 bits" in caplog.text
    metrics = read_metrics(tmp_path / "run")
    assert metrics["train"]["steps"] == 6 and metrics["after"]["loss"] < 10
    if strategy[0] == "strategy=neft":  # the reference run (a full fine-tune) ran on the unquantized model
        assert caplog.text.count("stored in 4 bits") == 1
        assert (tmp_path / "run" / "neft_delta.safetensors").exists()
    else:
        assert (tmp_path / "run" / "export" / "adapter_config.json").exists()
        assert "14 LoRA layers: peft.tuners.lora.bnb.Linear4bit" in caplog.text  # PEFT's own QLoRA layer
    # stage=eval of the run scores the model as it trained: the base in 4 bits again, under the trained tensors
    run(
        compose(
            [*tiny_overrides, "stage=eval", f"ckpt={tmp_path / 'run'}", f"paths.run_dir={tmp_path / 'eval'}"]
        )
    )
    assert "model.quantization=nf4: the saved run's base in 4 bits, as it trained" in caplog.text
    again = read_metrics(tmp_path / "eval")["after"]
    assert again["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-5)
    assert again["bleu"] == pytest.approx(metrics["after"]["bleu"], abs=1e-6)
    best = metrics["train"]["best_checkpoint"]  # the Lightning checkpoint the run evaluated: the same model
    run(compose([*tiny_overrides, "stage=eval", f"ckpt={best}", f"paths.run_dir={tmp_path / 'eval_ckpt'}"]))
    assert read_metrics(tmp_path / "eval_ckpt")["after"]["loss"] == pytest.approx(again["loss"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["neft", "lora"])
def test_eval_of_a_four_bit_run_on_the_exact_base_with_model_quantization_null(tmp_path, strategy):
    """`model.quantization=null` on the eval command line: the trained tensors on the unquantized base (NeFT's
    delta written into the exact weights, LoRA's adapters over plain linears), within the 4 bits' error."""
    from conftest import run_cli

    train = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false", *SHORT,
             "task.data.embedded.n_test=8", f"strategy={strategy}", "model.quantization=nf4",
             f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    train += ["selection.reference.steps=4"] if strategy == "neft" else []
    done = run_cli(train, tmp_path, 300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    trained = read_metrics(tmp_path / "run")["after"]["loss"]
    evaluate = ["stage=eval", f"ckpt={tmp_path / 'run'}", "model.quantization=null",
                f"hydra.run.dir={tmp_path / 'eval'}"]  # fmt: skip
    done = run_cli(evaluate, tmp_path, 300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "stored in 4 bits" not in output
    exact = read_metrics(tmp_path / "eval")["after"]["loss"]
    assert exact != trained and abs(exact - trained) < 0.2 * trained


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=full"], "a 4-bit base stays frozen, and this strategy trains every weight"),
        (["strategy=neft", "strategy.impl=masked"], "strategy.impl=masked trains the dense base weights"),
        (["strategy=lora", "strategy.merge_on_export=true"], "adapters cannot be merged into 4-bit weights"),
        (["model.quantization=int3"], "model.quantization='int3': choose nf4"),
    ],
)
def test_what_cannot_run_on_a_four_bit_base_is_refused_before_any_work(tiny_overrides, overrides, message):
    from neft_lab.config import compose
    from neft_lab.errors import ConfigError
    from neft_lab.validation import validate

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose([*tiny_overrides, "model.quantization=nf4", *overrides]))


def test_the_quantized_base_benchmark_runs_the_three_bases_on_the_tiny_model(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "quantized_base.py"), "--model", "tiny", "--steps", "2",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["base"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["float32", "bfloat16", "nf4"]
    assert len({r["trainable"] for r in rows.values()}) == 1  # the same vectors train on every base
    assert rows["nf4"]["static_mib"] < rows["bfloat16"]["static_mib"] < rows["float32"]["static_mib"]


@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_a_saved_four_bit_adapter_reloads_onto_a_quantized_base(impl, tmp_path):
    """The adapter a 4-bit run saves loads onto a fresh base, which is then quantized: the same model."""
    from neft_lab import NeuronModel

    model, _ = _four_bit_neft(impl)
    with torch.no_grad():
        for _, param in sliced.trainable_slices(model.hf_model):
            param.add_(0.05)
    model.save_pretrained(tmp_path / "adapter")
    loaded = NeuronModel.from_pretrained(base_model("llama"), tmp_path / "adapter")
    loaded.quantize_base()  # the base's own weights in 4 bits, as the run had them
    with pytest.raises(ConfigError, match="cannot merge on a 4-bit base"):
        loaded.merge()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)


def test_a_four_bit_model_counts_its_parameters_as_the_unquantized_one():
    """Budgets are shares of all parameters: a 4-bit weight (packed two to a byte) counts as its full shape, so
    `strategy.r=match` picks the same LoRA rank on a 4-bit base (QLoRA) as on the exact one."""
    from neft_lab.models.loading import parameter_count
    from neft_lab.strategies.lora import matched_rank

    exact, four_bit = base_model("llama"), base_model("llama")
    quantize_frozen_linears(four_bit, include_trainable=True)
    assert parameter_count(four_bit) == parameter_count(exact)
    assert matched_rank(four_bit, 0.09) == matched_rank(exact, 0.09)
