"""The sentences the utilization passes read: a task split, encoded exactly as for training and evaluation."""

from __future__ import annotations

from typing import Any

from neft_lab.data.encoding import PromptEncoder
from neft_lab.data.task import Task
from neft_lab.errors import ConfigError

SPLITS = ("train", "validation", "test")
# generated: the prompt, continued by each analysed model's own greedy output (the authors; the continuation is
# made per model by utilization.generate_sequences) | all: prompt + reference target, teacher-forced (as
# trained) | prompt: the prompt only
TOKENS = ("generated", "all", "prompt")


def split_sequences(
    task: Task,
    tokenizer: Any,
    split: str = "test",
    max_sentences: int | None = None,
    tokens: str = "generated",
    chat_template: bool = False,
    seed: int = 0,
) -> list[list[int]]:
    """Token ids of the first `max_sentences` examples of `split` (None: all of them); for `generated` the
    prompts, which each model then continues."""
    if split not in SPLITS:
        raise ConfigError(f"analysis.split={split!r}: choose one of {SPLITS}")
    if tokens not in TOKENS:
        raise ConfigError(f"analysis.tokens={tokens!r}: choose one of {TOKENS}")
    examples = task.load_splits(seed)[split][:max_sentences]
    encoder = PromptEncoder(tokenizer, task, chat_template=chat_template)
    if tokens in ("prompt", "generated"):
        return [encoder.encode_prompt(e) for e in examples]
    return [e.input_ids for e in encoder.encode_all(examples)]


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
