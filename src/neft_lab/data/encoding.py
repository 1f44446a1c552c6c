"""Prompt + target → token ids with a loss mask, the same way for training and generation.

The prompt is tokenized on its own and the target appended, so the model sees at evaluation
exactly the prefix it was trained to continue. Only target tokens (and the closing EOS) carry loss.

Instruction tasks render a record as the user's turn of the tokenizer's chat template (`model.chat_template`
true, or auto and the tokenizer has one), their targets closed by the template's end-of-turn token and EOS, or
with Stanford Alpaca's plain template (`task.prompt` / `task.prompt_with_input`), closed by EOS.

`task.prompt_style` other than `neft_lab` tokenizes as the paper authors' scripts did (docs/fidelity.md):
- `authors` (train_neuron/train_sft.py, baselines/train_sft.py: `tokenizer([input_s, output_s],
  add_special_tokens=False)`, no EOS appended): the training pair is prompt ids + target ids, no BOS, no EOS;
- `authors_inst` (baselines/train_with_lora.py: `tokenizer([input_s, output_s])`, EOS appended): prompt and
  target each with the tokenizer's special tokens (Llama-2: a BOS before each), then EOS;
- generation (infer/infer.py, infer/lora_model_infer.py) tokenizes the prompt with the tokenizer's defaults
  (Llama-2: BOS first), in both.
The target is tokenized on its own (no `task.target_prefix`), and no chat template applies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neft_lab.data.examples import Example
from neft_lab.data.task import INSTRUCTION, Task
from neft_lab.errors import ConfigError, DataError
from neft_lab.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    prompt_length: int  # tokens before the target; they carry no loss


CHAT_TEMPLATE_MODES = (True, False, "auto")


def use_chat_template(setting: bool | str, tokenizer: Any) -> bool:
    """`model.chat_template`: true (the tokenizer must have one), false, or auto (when the tokenizer has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has_template
    if setting not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"model.chat_template={setting!r}: choose true, false or auto")
    if setting and not has_template:
        raise DataError(
            "model.chat_template=true but the tokenizer has no chat template: set model.chat_template=false "
            "(or auto: use it where there is one)"
        )
    return bool(setting)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token a chat template closes an assistant turn with (Gemma's `<end_of_turn>`, Qwen's
    `<|im_end|>`, Llama-3's `<|eot_id|>`), read off the template by rendering one exchange; [] when it closes
    with nothing special or cannot render an assistant turn."""
    sentinel = "NEFTLABSENTINEL"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
    except Exception as err:  # noqa: BLE001 - templates raise anything (jinja errors, their own checks)
        logger.warning(
            "the chat template cannot render an assistant turn (%s): targets end with EOS only", err
        )
        return []
    if not isinstance(text, str) or sentinel not in text:
        return []
    tail = tokenizer(text.split(sentinel, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special
    }
    return [next(i for i in tail if i in special)] if any(i in special for i in tail) else []


class PromptEncoder:
    def __init__(self, tokenizer, task: Task, chat_template: bool | str = False) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError(
                "the tokenizer has no EOS token: set one (tokenizer.eos_token) so targets can end"
            )
        self.tokenizer = tokenizer
        self.task = task
        self.authors = task.prompt_style != "neft_lab"
        if self.authors and chat_template is True:
            raise ConfigError(
                f"task.prompt_style={task.prompt_style} is the authors' plain prompt: set model.chat_template=false "
                "(or auto), or task.prompt_style=neft_lab to use the chat template"
            )
        # the authors' special tokens around the training pair: none (authors) or the tokenizer's (authors_inst)
        self.pair_special_tokens = task.prompt_style == "authors_inst"
        self.chat_template = False if self.authors else use_chat_template(chat_template, tokenizer)
        self._overhead: int | None = None
        self.instruction = task.kind == INSTRUCTION
        # instruction tasks under a chat template: a target ends as the template ends an assistant turn, then EOS
        turn_end = end_of_turn_ids(tokenizer) if self.instruction and self.chat_template else []
        self.target_end = list(dict.fromkeys([*turn_end, tokenizer.eos_token_id]))
        if task.prompt_style == "authors":
            self.target_end = []
        # what generation stops at beyond the model's own EOS (instruction tasks: the end of a turn and EOS)
        self.stop_token_ids: tuple[int, ...] = tuple(self.target_end) if self.instruction else ()

    def prompt_text(self, source: str) -> str:
        text = self.task.format_prompt(source)
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def _tokenize(self, text: str, special: bool | None = None) -> list[int]:
        # a chat template already contains BOS; plain prompts get the tokenizer's special tokens
        special = not self.chat_template if special is None else special
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def instruction_text(self, instruction: str, input: str = "", with_input: bool | None = None) -> str:
        """An instruction record as prompt text: the user's turn of the chat template (the instruction, then
        the input after a blank line) or the task's plain template. `with_input` (default: a non-empty input)
        picks the form with an input section."""
        with_input = bool(input) if with_input is None else with_input
        if not self.chat_template:
            return self.task.render_instruction(instruction, input, with_input)
        content = f"{instruction}\n\n{input}" if with_input else instruction
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def encode_prompt(self, example: Example, training: bool = False) -> list[int]:
        """The prompt's ids for generation, or with `training` as the first part of a training pair (the same
        but under `task.prompt_style=authors`, whose training pairs carry no BOS)."""
        if self.instruction:
            return self._encode_instruction_prompt(example)
        special = self.pair_special_tokens if self.authors and training else None
        ids = self._tokenize(self.prompt_text(example.source), special)
        limit = self.task.max_prompt_tokens
        if len(ids) <= limit:
            return ids
        self._check_truncation(example, len(ids))
        text = self.prompt_text(self._truncated_source(example.source, limit, special))
        return self._tokenize(text, special)

    def _encode_instruction_prompt(self, example: Example) -> list[int]:
        meta = example.meta or {}
        instruction, input = meta.get("instruction", example.source), meta.get("input", "")
        ids = self._tokenize(self.instruction_text(instruction, input))
        limit = self.task.max_prompt_tokens
        if len(ids) <= limit:
            return ids
        self._check_truncation(example, len(ids))
        if input:  # cut the input (the context) before the instruction (the task itself)
            cut = self._fit(input, limit, lambda text: self.instruction_text(instruction, text, True))
            return self._tokenize(self.instruction_text(instruction, cut, True))
        cut = self._fit(instruction, limit, lambda text: self.instruction_text(text))
        return self._tokenize(self.instruction_text(cut))

    def _check_truncation(self, example: Example, length: int) -> None:
        if not self.task.truncate_source:
            raise DataError(
                f"{example.origin or 'an example'}: the prompt is {length} tokens, longer than "
                f"task.max_prompt_tokens={self.task.max_prompt_tokens}. Raise task.max_prompt_tokens, drop the "
                "example, or set task.truncate_source=true to cut long sources."
            )

    def _truncated_source(self, source: str, limit: int, special: bool | None = None) -> str:
        if special is not None:  # the authors' training prompt: tokenized without special tokens
            return self._fit(source, limit, self.prompt_text, special=special)
        if self._overhead is None:
            self._overhead = len(self._tokenize(self.prompt_text("")))
        return self._fit(source, limit, self.prompt_text, self._overhead)

    def _fit(
        self,
        text: str,
        limit: int,
        render: Callable[[str], str],
        overhead: int | None = None,
        special: bool | None = None,
    ) -> str:
        """The longest head of `text` whose rendered prompt fits in `limit` tokens."""
        if overhead is None:
            overhead = len(self._tokenize(render(""), special))
        budget = limit - overhead
        if budget <= 0:
            raise DataError(
                f"task.max_prompt_tokens={limit} leaves no room for the source after the prompt template"
            )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        for keep in range(budget, 0, -max(1, budget // 16)):
            head = self.tokenizer.decode(ids[:keep], skip_special_tokens=True)
            if len(self._tokenize(render(head), special)) <= limit:
                return head
        raise DataError(f"cannot fit any of the source into task.max_prompt_tokens={limit}")

    def encode_target(self, target: str) -> tuple[list[int], bool]:
        """Target ids closed by EOS (instruction tasks under a chat template: by its end-of-turn token, then
        EOS), and whether they had to be cut to task.max_target_tokens. The authors' styles: the target
        tokenized on its own, no EOS (`authors`) or with the tokenizer's special tokens and EOS (`authors_inst`)."""
        if self.authors:
            ids = self.tokenizer(target, add_special_tokens=self.pair_special_tokens)["input_ids"]
            if self.target_end and ids and ids[-1] == self.tokenizer.eos_token_id:
                ids = ids[:-1]  # train_with_lora.py appends EOS only when the target does not end with it
        else:
            ids = self.tokenizer(self.task.target_prefix + target, add_special_tokens=False)["input_ids"]
        keep = max(self.task.max_target_tokens - len(self.target_end), 0)
        return ids[:keep] + self.target_end, len(ids) > keep

    def encode_all(self, examples: list[Example]) -> list[Encoded]:
        encoded, cut = [], 0
        for example in examples:
            prompt = self.encode_prompt(example, training=True)
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
