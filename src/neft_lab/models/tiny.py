"""Tiny random causal LMs with a tokenizer built in code: real transformers classes, seconds to train.

The tokenizer is a byte-level BPE trained on the embedded task's text, so it encodes any UTF-8
(Chinese included) while keeping the embedded task's sequences short.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from neft_lab.data.embedded import sentence_pair
from neft_lab.errors import ConfigError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


# transformers' default (0.02) leaves a 64-wide model's frozen random head unable to make a confident prediction:
# every method that freezes the embeddings (NeFT, LoRA) then stalls at the unigram loss. 0.1 lifts that cap.
INIT_STD = 0.1


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    rng = random.Random(seed)
    corpus = [text for _ in range(3000) for text in sentence_pair(rng)]
    corpus.append("Translate English to French. Chinese: English: Summary: Article:\n")
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _config(
    arch: str,
    vocab_size: int,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    max_positions: int,
    init_std: float = INIT_STD,
):
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            initializer_range=init_std,
            **ids,
        )
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            max_position_embeddings=max_positions,
            sliding_window=64,
            final_logit_softcapping=30.0,
            initializer_range=init_std,
            **ids,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            initializer_range=init_std,
            **ids,
        )
    raise ConfigError(f"unknown tiny architecture '{arch}': choose llama, gemma3 or gpt2 (model.tiny.arch)")


def build_tiny_model(
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 1024,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = INIT_STD,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised model of the given family and its tokenizer, identical for the same seed."""
    tokenizer = build_tokenizer(vocab_size, seed)
    config = _config(
        arch,
        len(tokenizer),
        tokenizer,
        hidden_size,
        num_layers,
        intermediate_size,
        num_heads,
        num_kv_heads,
        max_positions,
        init_std,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
