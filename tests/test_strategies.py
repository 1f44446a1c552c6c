"""Full trains everything, LoRA only adapters, FT-embed / FT-{in,out} exactly their weights; exports load back."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import PeftModel

from conftest import read_metrics
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.models.loading import load_pretrained, parameter_count
from neft_lab.models.tiny import build_tiny_model
from neft_lab.pipeline import run
from neft_lab.strategies import StrategyContext, build_strategy
from neft_lab.strategies.full import FullFineTuning
from neft_lab.strategies.lora import LoraStrategy
from neft_lab.strategies.partial import PartialFineTuning


def _train_one_step(model, strategy):
    optimizer = torch.optim.AdamW([p for _, p in strategy.trainable_named_parameters(model)], lr=1e-2)
    ids = torch.randint(4, 500, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_full_trains_every_parameter():
    model, _ = build_tiny_model()
    strategy = FullFineTuning()
    model = strategy.apply(model, StrategyContext())
    summary = strategy.summary(model, parameter_count(model))
    assert summary["trainable_parameters"] == summary["total_parameters"] == parameter_count(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_one_step(model, strategy)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_lora_trains_only_adapters(arch):
    model, _ = build_tiny_model(arch)
    base = parameter_count(model)
    strategy = LoraStrategy(r=4)
    model = strategy.apply(model, StrategyContext())
    names = [n for n, _ in strategy.trainable_named_parameters(model)]
    assert names and all("lora_" in n for n in names)
    assert not any("lm_head" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_one_step(model, strategy)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        if "lora_B" in name:
            assert changed, name  # B starts at zero and must move
        if "lora_" not in name:
            assert not changed, f"frozen {name} changed"
    summary = strategy.summary(model, base)
    assert 0 < summary["trainable_percent"] < 100


def test_lora_with_unknown_modules_names_the_real_ones():
    model, _ = build_tiny_model()
    with pytest.raises(ConfigError, match="up_proj"):
        LoraStrategy(target_modules=["nonexistent_proj"]).apply(model, StrategyContext())


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown strategy 'nope'.*full.*lora"):
        build_strategy({"name": "nope"})
    with pytest.raises(ConfigError, match="strategy 'lora'"):
        build_strategy({"name": "lora", "rank": 4})


def test_exports_reload_to_identical_logits(tmp_path):
    ids = torch.randint(4, 500, (1, 10))
    model, tokenizer = build_tiny_model()
    full = FullFineTuning()
    model = full.apply(model, StrategyContext())
    _train_one_step(model, full)
    full.export(model, tokenizer, tmp_path / "full")
    reloaded = load_pretrained(tmp_path / "full", torch.float32)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    base, tokenizer = build_tiny_model()
    lora = LoraStrategy(r=4)
    adapted = lora.apply(base, StrategyContext())
    _train_one_step(adapted, lora)
    lora.export(adapted, tokenizer, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    restored = PeftModel.from_pretrained(build_tiny_model()[0], str(tmp_path / "lora"))
    torch.testing.assert_close(restored(input_ids=ids).logits, adapted(input_ids=ids).logits)


# ---- FT-embed and FT-{in,out}: dense partial fine-tuning (strategies/partial.py) ----------------------
def _partial(name: str) -> PartialFineTuning:
    """The strategy exactly as `strategy=<name>` composes it from conf/strategy/<name>.yaml."""
    strategy = build_strategy(compose([f"strategy={name}"]).strategy)
    assert isinstance(strategy, PartialFineTuning) and strategy.name == name
    return strategy


def _expected_names(arch: str, strategy: str) -> set[str]:
    if strategy == "ft_embed":
        return {"transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"}
    if arch == "gpt2":  # Conv1D c_fc / c_proj are GPT-2's up / down
        return {f"transformer.h.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("c_fc", "c_proj")}
    return {f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1) for m in ("up", "down")}


def _adamw_steps(model, steps: int = 3) -> None:
    """A plain loop over ALL parameters: only freezing (no grad) may keep a tensor unchanged."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        ids = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


@pytest.mark.parametrize("strategy_name", ["ft_embed", "ft_in_out"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_partial_trains_exactly_the_named_weights(arch, strategy_name):
    model, _ = build_tiny_model(arch)
    strategy = _partial(strategy_name)
    model = strategy.apply(model, StrategyContext())
    expected = _expected_names(arch, strategy_name)
    assert {n for n, _ in strategy.trainable_named_parameters(model)} == expected
    # every name a tensor is known by (a tied LM head is the embedding under a second name)
    aliases = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    trained_ids = {id(aliases[n]) for n in expected}
    before = {n: p.detach().clone() for n, p in aliases.items()}
    _adamw_steps(model)
    for name, param in aliases.items():
        if id(param) in trained_ids:
            assert not torch.equal(before[name], param), f"{name} did not train"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(before[name], param), f"frozen {name} changed"
    summary = strategy.summary(model, parameter_count(model))
    assert summary["trains"] == (["embed"] if strategy_name == "ft_embed" else ["up", "down"])
    assert summary["trainable_parameters"] == sum(aliases[n].numel() for n in expected)
    assert 0 < summary["trainable_percent"] < 100


def test_ft_embed_says_when_the_lm_head_trains_with_the_embedding(caplog):
    from transformers import AutoModelForCausalLM

    tied, tokenizer = build_tiny_model("llama")  # the tiny models tie the head to the embedding
    untied = AutoModelForCausalLM.from_config(
        type(tied.config)(**{**tied.config.to_dict(), "tie_word_embeddings": False})
    )
    for model, is_tied in ((tied, True), (untied, False)):
        strategy = _partial("ft_embed")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="neft_lab.strategies.partial"):
            model = strategy.apply(model, StrategyContext())
        assert ("also trains the output projection" in caplog.text) is is_tied
        assert strategy.summary(model, parameter_count(model))["embedding_tied_to_lm_head"] is is_tied
        head = model.get_output_embeddings().weight
        before = head.detach().clone()
        _adamw_steps(model)
        assert torch.equal(before, head) is not is_tied  # Llama-2's untied head stays frozen
        assert (head is model.get_input_embeddings().weight) is is_tied  # never silently untied


def test_partial_rejects_what_it_cannot_train():
    with pytest.raises(
        ConfigError, match=r"strategy.train=\['embed', 'mlp'\].*'up', 'down'.*unknown: \['mlp'\]"
    ):
        build_strategy({"name": "ft_embed", "train": ["embed", "mlp"]})
    with pytest.raises(ConfigError, match="must name one or more of"):
        build_strategy({"name": "ft_in_out", "train": []})
    gpt2, _ = build_tiny_model("gpt2")
    with pytest.raises(
        ConfigError, match=r"gpt2 models have no \['gate'\] weights.*embed or \['down', 'o', 'up'\]"
    ):
        build_strategy({"name": "ft_in_out", "train": ["up", "gate"]}).apply(gpt2, StrategyContext())


def test_partial_export_reloads_to_identical_logits(tmp_path):
    ids = torch.randint(4, 500, (1, 10))
    model, tokenizer = build_tiny_model("gemma3")
    strategy = _partial("ft_in_out")
    model = strategy.apply(model, StrategyContext())
    _adamw_steps(model, steps=1)
    strategy.export(model, tokenizer, tmp_path / "export")
    reloaded = load_pretrained(tmp_path / "export", torch.float32)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_ft_runs_end_to_end_and_report_lists_them(tiny_overrides, tmp_path):
    """strategy=ft_embed / ft_in_out train in the pipeline; the report gives each its own row and BLEU kind."""
    base = [o for o in tiny_overrides if not o.startswith("paths.run_dir=")]
    short = [
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "eval.before=false",
        "task.data.embedded.n_test=8",
    ]
    frozen_reference, _ = build_tiny_model()  # the smoke model: same seed, same weights before training
    for name, extra in (("ft_embed", ["task.bleu_lowercase=true"]), ("ft_in_out", [])):
        run_dir = tmp_path / "runs" / name
        run(compose([*base, *short, *extra, f"strategy={name}", f"paths.run_dir={run_dir}"]))
        metrics = read_metrics(run_dir)
        expected = _expected_names("llama", name)
        assert metrics["strategy"] == name and metrics["train"]["steps"] == 4
        assert metrics["trainable_parameters"] == sum(
            p.numel() for n, p in frozen_reference.named_parameters() if n in expected
        )
        case = "case:lc" if extra else "case:mixed"
        assert case in metrics["after"]["bleu_signature"]
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        assert {k.removeprefix("model.") for k in ckpt["state_dict"]} == expected  # only what it trains
        exported = load_pretrained(run_dir / "export", torch.float32).state_dict()
        for key, tensor in frozen_reference.state_dict().items():
            trained = key in expected or (name == "ft_embed" and key == "lm_head.weight")  # tied
            assert torch.equal(exported[key], tensor) is not trained, key

    run(compose(["stage=report", f"report.dir={tmp_path / 'runs'}", f"report.out={tmp_path / 'out'}"]))
    markdown = (tmp_path / "out" / "table.md").read_text()
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")
        for line in markdown.splitlines()[2:]
        if line.startswith("|")
    }
    assert list(rows) == ["FT-embed", "FT-{in,out}"]
    for label, name in (("FT-embed", "ft_embed"), ("FT-{in,out}", "ft_in_out")):
        share = read_metrics(tmp_path / "runs" / name)["trainable_percent"]
        assert rows[label][-5] == format(
            share, ".3g"
        )  # the trainable % column (then step s, wall min, peak mem, runs)
    assert "BLEU (sacreBLEU): the runs used different signatures:" in markdown
    assert "case:lc" in markdown and "case:mixed" in markdown
