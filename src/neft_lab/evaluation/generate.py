"""Batched greedy generation with left padding, stopping at EOS or the task's stop strings (instruction tasks:
also at the chat template's end-of-turn token).

Decoding options of the task: `no_repeat_ngram_size` (the authors': 4) and `newlines` — `cut` keeps what precedes
the first newline (a newline stops generation), `strip` deletes every newline of the output and lets generation
run to EOS or `max_new_tokens`, as the authors' infer/infer.py (`.replace('\n', '').strip()`)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from neft_lab.data.encoding import PromptEncoder
from neft_lab.data.examples import Example
from neft_lab.data.task import Task


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """Keep what comes before the first stop string; strip surrounding whitespace."""
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


def finish_prediction(text: str, task: Task) -> str:
    """The prediction scored from a decoded continuation: cut at the task's stop strings (`newlines=cut`), or,
    with `newlines=strip`, every newline deleted and the other stop strings applied."""
    if task.newlines == "strip":
        return cut_at_stop(text.replace("\n", ""), _stop_strings(task))
    return cut_at_stop(text, task.stop)


def _stop_strings(task: Task) -> tuple[str, ...]:
    """The strings that end generation: the task's, less the newline when newlines are stripped."""
    if task.newlines == "strip":
        return tuple(s for s in task.stop if s and s != "\n")
    return tuple(s for s in task.stop if s)


def stop_token_ids(model: nn.Module, encoder: PromptEncoder) -> list[int]:
    """The token ids generation ends at when the encoder names some (the model's own EOS ids, then the
    encoder's: an instruction task's end of turn and EOS); [] leaves the model's generation config alone."""
    if not encoder.stop_token_ids:
        return []
    config = getattr(model, "generation_config", None)
    own = getattr(config, "eos_token_id", None)
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    return list(dict.fromkeys([*own, *encoder.stop_token_ids]))


SOURCE_SLACK = 16  # new tokens allowed beyond ratio x source length (short sources, punctuation, EOS)


def batch_new_tokens(encoder: PromptEncoder, examples: list[Example], limit: int | None = None) -> int:
    """How many new tokens a batch may generate: `limit` or `task.max_new_tokens`, and with
    `task.max_new_tokens_ratio` at most ratio x the batch's longest source + SOURCE_SLACK. A translation is
    rarely longer than twice its source (WMT21 zh→en references: at most 1.8x in Gemma tokens), while a model
    that never writes the stop string keeps its whole batch generating to the limit: the cap ends that early."""
    task = encoder.task
    cap = limit or task.max_new_tokens
    if task.max_new_tokens_ratio is None or not examples:
        return cap
    longest = max(len(encoder.tokenizer(e.source, add_special_tokens=False).input_ids) for e in examples)
    return max(1, min(cap, math.ceil(task.max_new_tokens_ratio * longest) + SOURCE_SLACK))


@torch.no_grad()
def generate_predictions(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: list[Example],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of each example's prompt, in the order of `examples`."""
    tokenizer, task = encoder.tokenizer, encoder.task
    prompts = [encoder.encode_prompt(e) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths → little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: dict[int, str] = {}
    stop_strings = list(_stop_strings(task))
    no_repeat = {"no_repeat_ngram_size": task.no_repeat_ngram_size} if task.no_repeat_ngram_size else {}
    stop_ids = stop_token_ids(model, encoder)
    # counts sentences, not batches
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="sent")
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for r, i in enumerate(rows):
                input_ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention_mask[r, width - len(prompts[i]) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                max_new_tokens=batch_new_tokens(encoder, [examples[i] for i in rows], max_new_tokens),
                pad_token_id=pad,
                stop_strings=stop_strings or None,
                tokenizer=tokenizer if stop_strings else None,
                use_cache=True,
                temperature=None,
                top_p=None,
                top_k=None,
                **no_repeat,
                **({"eos_token_id": stop_ids} if stop_ids else {}),
            )
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts):
                outputs[i] = finish_prediction(text, task)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return [outputs[i] for i in range(len(examples))]
