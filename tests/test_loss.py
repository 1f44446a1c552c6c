"""Logits only at target positions give exactly the loss of the full logits (soft-capping included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neft_lab import losses as loss_module
from neft_lab.data.encoding import PromptEncoder, TrainCollator
from neft_lab.data.examples import Example
from neft_lab.data.task import Task
from neft_lab.losses import IGNORE_INDEX
from neft_lab.models.tiny import build_tiny_model


def _batch(tokenizer):
    task = Task(
        name="t",
        kind="translation",
        source_lang="en",
        target_lang="fr",
        prompt="English: {source}\nFrench:",
        metrics=("bleu",),
        max_prompt_tokens=64,
        max_target_tokens=32,
        max_new_tokens=8,
    )
    examples = [
        Example("The cat.", "Le chat."),
        Example("The small black dog eats.", "Le petit chien noir mange."),
        Example("A bird.", "Un oiseau qui chante bien."),
    ]
    return TrainCollator(tokenizer.pad_token_id)(PromptEncoder(tokenizer, task).encode_all(examples))


def _reference_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("mask_slicing", [True, False])
def test_target_only_logits_match_full_logits(arch, mask_slicing, monkeypatch):
    monkeypatch.setattr(loss_module, "MASK_SLICING", mask_slicing and loss_module.mask_slicing_supported())
    model, tokenizer = build_tiny_model(arch)
    model.eval()
    batch = _batch(tokenizer)
    loss, n_tokens = loss_module.target_token_loss(model, batch)
    assert n_tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, _reference_loss(model, batch), rtol=1e-5, atol=1e-6)


def test_gemma_softcapping_is_applied():
    model, tokenizer = build_tiny_model("gemma3")
    assert model.config.final_logit_softcapping
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # huge raw logits: only the soft-cap keeps them below the cap
    logits = model(input_ids=_batch(tokenizer)["input_ids"], logits_to_keep=torch.tensor([2])).logits
    assert logits.abs().max() <= model.config.final_logit_softcapping
