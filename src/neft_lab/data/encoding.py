"""Prompt + target → token ids with a loss mask, the same way for training and generation.

The prompt is tokenized on its own and the target appended, so the model sees at evaluation
exactly the prefix it was trained to continue. Only target tokens (and the closing EOS) carry loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from neft_lab.data.examples import Example
from neft_lab.data.task import Task
from neft_lab.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    prompt_length: int  # tokens before the target; they carry no loss


class PromptEncoder:
    def __init__(self, tokenizer, task: Task, chat_template: bool = False) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError(
                "the tokenizer has no EOS token: set one (tokenizer.eos_token) so targets can end"
            )
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "model.chat_template=true but the tokenizer has no chat template: set model.chat_template=false"
            )
        self.tokenizer = tokenizer
        self.task = task
        self.chat_template = chat_template
        self._overhead: int | None = None

    def prompt_text(self, source: str) -> str:
        text = self.task.format_prompt(source)
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def _tokenize(self, text: str) -> list[int]:
        # a chat template already contains BOS; plain prompts get the tokenizer's special tokens
        return self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]

    def encode_prompt(self, example: Example) -> list[int]:
        ids = self._tokenize(self.prompt_text(example.source))
        limit = self.task.max_prompt_tokens
        if len(ids) <= limit:
            return ids
        if not self.task.truncate_source:
            raise DataError(
                f"{example.origin or 'an example'}: the prompt is {len(ids)} tokens, longer than "
                f"task.max_prompt_tokens={limit}. Raise task.max_prompt_tokens, drop the example, "
                "or set task.truncate_source=true to cut long sources."
            )
        return self._tokenize(self.prompt_text(self._truncated_source(example.source, limit)))

    def _truncated_source(self, source: str, limit: int) -> str:
        if self._overhead is None:
            self._overhead = len(self._tokenize(self.prompt_text("")))
        budget = limit - self._overhead
        if budget <= 0:
            raise DataError(
                f"task.max_prompt_tokens={limit} leaves no room for the source after the prompt template"
            )
        source_ids = self.tokenizer(source, add_special_tokens=False)["input_ids"]
        for keep in range(budget, 0, -max(1, budget // 16)):
            text = self.tokenizer.decode(source_ids[:keep], skip_special_tokens=True)
            if len(self._tokenize(self.prompt_text(text))) <= limit:
                return text
        raise DataError(f"cannot fit any of the source into task.max_prompt_tokens={limit}")

    def encode_target(self, target: str) -> tuple[list[int], bool]:
        """Target ids closed by EOS, and whether they had to be cut to task.max_target_tokens."""
        ids = self.tokenizer(self.task.target_prefix + target, add_special_tokens=False)["input_ids"]
        keep = self.task.max_target_tokens - 1
        return ids[:keep] + [self.tokenizer.eos_token_id], len(ids) > keep

    def encode_all(self, examples: list[Example]) -> list[Encoded]:
        encoded, cut = [], 0
        for example in examples:
            prompt = self.encode_prompt(example)
            target, was_cut = self.encode_target(example.target)
            encoded.append(Encoded(prompt + target, len(prompt)))
            cut += was_cut
        if cut:
            logger.warning(
                "%d of %d targets were cut to task.max_target_tokens=%d",
                cut,
                len(examples),
                self.task.max_target_tokens,
            )
        return encoded


class TrainCollator:
    """Right-pads a batch; labels are -100 on the prompt and the padding."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(batch):
            ids = torch.tensor(example.input_ids, dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, example.prompt_length : len(ids)] = ids[example.prompt_length :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
