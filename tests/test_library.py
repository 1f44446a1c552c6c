"""The library API beyond the contract matrix (tests/test_library_contract.py): scoring and selection without
Hydra, one adapter format with the CLI, HF Trainer checkpoints and resume, refusals, and the examples."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library_helpers import INPUT, base_model, logits, same_state, trained
from neft_lab import (
    NeuronConfig,
    NeuronModel,
    get_neuron_model,
    gradient_neuron_scores,
    score_neurons,
    select_neurons,
)
from neft_lab.errors import ConfigError
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons import sliced
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.scoring import WeightSource, cosine_scores
from neft_lab.neurons.selection import budget_share

REPO = Path(__file__).resolve().parents[1]
COMMON = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"]


def _moved(arch: str = "llama", seed: int = 3) -> torch.nn.Module:
    """The tiny model with every weight nudged: a stand-in for a short full fine-tune."""
    model = base_model(arch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


# ---- scoring and selection ------------------------------------------------------------------------------------
def test_score_neurons_reads_models_and_folders_alike_and_selects_the_most_moved(tmp_path):
    base, tuned = base_model("llama"), _moved()
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    scores = score_neurons(base, tuned)
    from_files = score_neurons(tmp_path / "base", tmp_path / "tuned")
    space = NeuronSpace.from_model(base)
    direct = cosine_scores(WeightSource(base), WeightSource(tuned), space, progress=False)
    for name in direct:
        assert torch.equal(scores.scores[name], direct[name]) and torch.equal(
            from_files.scores[name], direct[name]
        )
    assert scores.scorer == "cosine" and scores.total_parameters == sum(p.numel() for p in base.parameters())
    chosen = select_neurons(scores, vectors=20)
    assert chosen.num_vectors == 20
    flat = torch.cat([scores.scores[g.name] for g in space.groups])
    picked = torch.cat([scores.scores[name][idx] for name, idx in chosen.indices.items()])
    assert picked.max() <= flat.sort().values[19]  # the 20 lowest cosines: the most moved vectors
    paper = select_neurons(scores, budget="paper_9")
    assert (
        paper.num_parameters <= budget_share("paper_9") * scores.total_parameters < paper.num_parameters + 64
    )
    assert paper.meta["budget"] == {"kind": "share", "value": budget_share("paper_9"), "label": "paper_9"}


def test_gradient_scores_select_the_vectors_the_loss_pulls_hardest():
    model = base_model("gpt2")
    batches = [{"input_ids": INPUT, "attention_mask": torch.ones_like(INPUT), "labels": INPUT}]
    scores = gradient_neuron_scores(model, batches)
    assert scores.scorer == "gradient"
    chosen = select_neurons(scores, vectors=10)
    flat = torch.cat(list(scores.scores.values()))
    picked = torch.cat([scores.scores[name][idx] for name, idx in chosen.indices.items()])
    assert picked.min() >= flat.sort(descending=True).values[9]  # HIGH is selected first for this scorer
    wrapped = get_neuron_model(model, NeuronConfig(scores=scores, vectors=10))
    assert wrapped.neuron_set.num_vectors == 10


@pytest.mark.bad_input
def test_selection_mistakes_are_refused_in_one_line():
    model = base_model("llama")
    for call, fragment in [
        (lambda: select_neurons(model, budget=0.05), "needs scores"),
        (lambda: select_neurons(model, method="random"), "give one budget"),
        (lambda: select_neurons(model, budget="paper_8", method="random"), "paper_8"),
        (lambda: get_neuron_model(model, NeuronConfig(budget=0.05)), "NeuronConfig needs neurons="),
        (lambda: NeuronConfig(impl="masked"), "choose one of ('fused', 'delta')"),
    ]:
        with pytest.raises(ConfigError) as err:
            call()
        assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not any(isinstance(m, sliced.SlicedLinear) for m in model.modules())  # refused before attaching


# ---- one format with the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A CLI run folder as `strategy=random_neuron` leaves it (neuron_set + neft_delta), its vectors moved."""
    from neft_lab.config import compose
    from neft_lab.strategies import build_strategy
    from neft_lab.strategies.base import StrategyContext

    root = tmp_path_factory.mktemp("cli_run")
    cfg = compose([*COMMON, "strategy=random_neuron"])
    model, tokenizer = build_tiny_model("llama")
    strategy = build_strategy(cfg.strategy)
    model = strategy.apply(model, StrategyContext(cfg=cfg, run_dir=root))
    with torch.no_grad():
        for _, param in sliced.trainable_slices(model):
            param.add_(0.1)
    strategy.export(model, tokenizer, root / "export")
    return root


def test_from_pretrained_reads_a_cli_run_folder(cli_run):
    expected = base_model("llama")
    sliced.apply_delta(
        expected, load_file(str(cli_run / "neft_delta.safetensors"))
    )  # what stage=eval evaluates
    for path in (cli_run, cli_run / "neft_delta.safetensors"):
        model = NeuronModel.from_pretrained(base_model("llama"), path)
        assert torch.equal(logits(model), logits(expected))
        assert model.neuron_config.impl == "fused"
    assert model.neuron_set.meta["method"] == "random"  # how the run chose it, from its neuron_set.json


def test_the_cli_merges_a_library_adapter(tmp_path):
    from neft_lab.config import compose
    from neft_lab.models.loading import load_pretrained
    from neft_lab.pipeline import run

    model = trained("llama", "delta")
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    overrides = [f"ckpt={tmp_path / 'adapter'}", f"export.out={out}", f"paths.run_dir={tmp_path / 'run'}"]
    run(compose([*COMMON, "stage=export", "model=tiny", *overrides, f"paths.cache_dir={tmp_path / 'c'}"]))
    merged = load_pretrained(out, torch.float32).state_dict()
    assert same_state(merged, model.merge_and_unload().state_dict()) == []


@pytest.mark.bad_input
def test_another_base_is_refused_in_one_line_naming_both_hashes(tmp_path):
    trained("gpt2", "fused").save_pretrained(tmp_path)
    other = build_tiny_model("gpt2", seed=1)[0]
    recorded = json.loads((tmp_path / "neft_config.json").read_text())["base"]["hash"]
    found = sliced.base_hash(other, sliced.delta_modules(load_file(str(tmp_path / "neft_delta.safetensors"))))
    with pytest.raises(
        ConfigError, match=rf"another base model: its base hash is {recorded[:16]}.*{found[:16]}"
    ) as err:
        NeuronModel.from_pretrained(other, tmp_path)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, sliced.SlicedLinear) for m in other.modules())
    with pytest.raises(ConfigError, match="does not fit"):  # another architecture
        NeuronModel.from_pretrained(base_model("llama"), tmp_path)


@pytest.mark.bad_input
def test_a_config_of_another_save_and_a_peft_folder_are_refused(tmp_path):
    trained("llama", "fused").save_pretrained(tmp_path / "a")
    trained("llama", "fused", steps=3).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "neft_config.json").replace(tmp_path / "a" / "neft_config.json")
    with pytest.raises(ConfigError, match="different saves"):
        NeuronModel.from_pretrained(base_model("llama"), tmp_path / "a")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="PEFT adapter"):
        NeuronModel.from_pretrained(base_model("llama"), tmp_path / "peft")


@pytest.mark.bad_input
def test_a_checkpoint_of_another_neuron_set_is_refused():
    mine = trained("llama", "fused")
    other = get_neuron_model(base_model("llama"), NeuronConfig(method="random", budget=0.05, seed=1))
    with pytest.raises(ConfigError, match="another neuron set"):
        mine.load_state_dict(other.state_dict())


# ---- HF Trainer: save_steps checkpoints and resume_from_checkpoint ---------------------------------------------
@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_a_trainer_run_resumed_from_its_checkpoint_is_bit_identical(impl, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StopAt(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                control.should_training_stop = True

    rows = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in INPUT.repeat(4, 1)
    ]

    def train(out, stop=None, resume=None):
        model = get_neuron_model(base_model("llama"), NeuronConfig(method="random", budget=0.05, impl=impl))
        args = TrainingArguments(
            str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, save_steps=2, use_cpu=True,
            bf16=True, gradient_checkpointing=True, report_to=[], disable_tqdm=True, logging_strategy="no", seed=0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[StopAt(stop)] if stop else []).train(
            resume_from_checkpoint=resume
        )
        return model

    whole = train(tmp_path / "whole")
    at_two = train(tmp_path / "cut", stop=2)
    # a checkpoint folder loads as an adapter, the way PEFT users load checkpoint-N of a LoRA run
    loaded = NeuronModel.from_pretrained(base_model("llama"), tmp_path / "cut" / "checkpoint-2")
    assert loaded.neuron_config.impl == impl and same_state(loaded.state_dict(), at_two.state_dict()) == []
    with torch.autocast("cpu", dtype=torch.bfloat16):  # accelerate left at_two's forward under bf16 autocast
        assert torch.equal(logits(loaded), logits(at_two.eval()))
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT's default: is_trainable=False
    with pytest.raises(ConfigError, match="has no neuron vectors in|does not fit|other"):
        NeuronModel.from_pretrained(base_model("gpt2"), tmp_path / "cut" / "checkpoint-2")
    checkpoint = load_file(str(tmp_path / "cut" / "checkpoint-2" / "model.safetensors"))
    assert set(checkpoint) == set(whole.state_dict())  # a checkpoint holds the vectors (and indices) only
    resumed = train(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert same_state(resumed.state_dict(), whole.state_dict()) == []
    assert torch.equal(logits(resumed.eval()), logits(whole.eval()))


# ---- the examples ---------------------------------------------------------------------------------------------
def _example(name: str, cwd: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), "--out", str(cwd / "out"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", ["hf_trainer.py", "trl_sft.py", "accelerate_loop.py"])
def test_the_examples_are_short(name):
    assert len((REPO / "examples" / name).read_text().splitlines()) < 80


def test_the_hf_trainer_example_trains_resumes_and_reloads(tmp_path):
    first = _example("hf_trainer.py", tmp_path, "--steps", "4")
    assert "trainable params:" in first and "trained to step 4" in first
    assert "the reloaded adapter reproduces the trained model: True" in first
    resumed = _example("hf_trainer.py", tmp_path, "--steps", "6", "--resume", "--impl", "fused")
    assert "trained to step 6" in resumed and "reproduces the trained model: True" in resumed
    assert sorted(p.name for p in (tmp_path / "out" / "adapter").iterdir()) == [
        "neft_config.json",
        "neft_delta.safetensors",
    ]


def test_the_accelerate_example_trains_saves_and_reloads(tmp_path):
    out = _example("accelerate_loop.py", tmp_path, "--steps", "4")
    assert "trainable params:" in out and "trained 4 steps" in out
    assert "the reloaded adapter reproduces the trained model: True" in out
    loaded = NeuronModel.from_pretrained(build_tiny_model("llama")[0], tmp_path / "out" / "adapter")
    assert 0 < loaded.neuron_set.num_vectors < loaded.neuron_set.space.num_vectors


def test_the_trl_example_scores_from_a_reference_and_trains(tmp_path):
    pytest.importorskip("trl", reason="TRL is in the dev extra")
    out = _example("trl_sft.py", tmp_path, "--steps", "2", "--reference-steps", "2")
    assert "trainable params:" in out and "with the lowest cosine" in out
    loaded = NeuronModel.from_pretrained(build_tiny_model("llama")[0], tmp_path / "out" / "adapter")
    assert loaded.neuron_set.meta["scorer"] == "cosine"


def test_the_readme_opens_with_library_use_that_runs(tmp_path, monkeypatch):
    """The README's first code block, before the CLI quickstart, is 8-12 lines of library use; it runs as printed
    with the tiny model for the hub model, a nudged copy for the full fine-tune, two Trainer steps on the CPU."""
    from transformers import Trainer, TrainingArguments

    readme = (REPO / "README.md").read_text()
    assert readme.index("```") == readme.index("```python") < readme.index("## Quickstart")
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert 8 <= len([line for line in code.splitlines() if line.strip()]) <= 12
    monkeypatch.chdir(tmp_path)
    _moved().save_pretrained(tmp_path / "runs" / "full-ft-200-steps")

    class AutoModelForCausalLM:
        from_pretrained = staticmethod(lambda name: base_model("llama"))

    def arguments(out, **kwargs):
        kwargs.update(
            max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to=[], disable_tqdm=True
        )
        return TrainingArguments(str(tmp_path / out), **kwargs)

    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in INPUT]
    names = {"AutoModelForCausalLM": AutoModelForCausalLM, "Trainer": Trainer, "TrainingArguments": arguments}
    exec(re.sub(r"^from transformers import .*$", "", code, flags=re.M), {**names, "data": rows})  # noqa: S102
    assert sorted(p.name for p in (tmp_path / "out" / "adapter").iterdir()) == [
        "neft_config.json",
        "neft_delta.safetensors",
    ]
