"""Full trains everything, LoRA trains only adapters, and exports load back to the same model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from neft_lab.errors import ConfigError
from neft_lab.models.loading import load_pretrained, parameter_count
from neft_lab.models.tiny import build_tiny_model
from neft_lab.strategies import StrategyContext, build_strategy
from neft_lab.strategies.full import FullFineTuning
from neft_lab.strategies.lora import LoraStrategy


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
