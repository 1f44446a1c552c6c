"""`loader.group_by_length=true`: batches of similar length from the same seeded shuffle, resumable, on every
rank; the validation loss unchanged; the reference cache key unchanged while the option is off."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import open_dict

from conftest import read_metrics, same_exported_weights
from neft_lab.config import compose
from neft_lab.data.datamodule import MEGABATCH_BATCHES, EpochShuffleSampler, TaskDataModule
from neft_lab.data.encoding import PromptEncoder
from neft_lab.data.task import Task
from neft_lab.losses import target_token_losses
from neft_lab.models.loading import load_model
from neft_lab.pipeline import run

SIZE, BATCH = 1000, 8
LENGTHS = [random.Random(i).randint(5, 300) for i in range(SIZE)]


def _batches(order: list[int], batch: int = BATCH) -> list[list[int]]:
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _padding(order: list[int]) -> int:
    """Pad tokens when each batch is padded to its longest example."""
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in _batches(order))


def test_grouped_order_is_the_seeded_shuffle_in_steps_of_similar_length_in_random_order():
    plain = list(EpochShuffleSampler(SIZE, seed=3, batch_size=BATCH))
    sampler = EpochShuffleSampler(SIZE, seed=3, lengths=LENGTHS, batch_size=BATCH)
    first, second = list(sampler), list(sampler)  # two epochs
    assert sorted(first) == sorted(second) == list(range(SIZE)) and first != second
    assert list(EpochShuffleSampler(SIZE, seed=3, lengths=LENGTHS, batch_size=BATCH)) == first  # seeded
    run = MEGABATCH_BATCHES * BATCH
    for start in range(0, SIZE, run):  # the same examples as the plain shuffle's run, regrouped
        assert set(first[start : start + run]) == set(plain[start : start + run])
    assert _padding(first) < 0.1 * _padding(plain)
    longest = [max(LENGTHS[i] for i in batch) for batch in _batches(first[:run])]
    assert longest != sorted(longest, reverse=True)  # not a long-to-short curriculum
    early, late = sum(longest[:10]) / 10, sum(longest[-10:]) / 10
    assert abs(early - late) < 0.35 * max(early, late)


def test_grouped_order_resumes_mid_epoch_and_deals_similar_lengths_to_every_rank():
    whole = EpochShuffleSampler(SIZE, seed=1, lengths=LENGTHS, batch_size=BATCH)
    epochs = [list(whole), list(whole)]
    resumed = EpochShuffleSampler(SIZE, seed=1, lengths=LENGTHS, batch_size=BATCH)
    resumed.start_at(1, 24)  # after 3 batches of the second epoch
    assert list(resumed) == epochs[1][24:]

    ranks = [list(EpochShuffleSampler(SIZE, 1, rank, 2, LENGTHS, BATCH)) for rank in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(SIZE))
    for b0, b1 in zip(_batches(ranks[0]), _batches(ranks[1]), strict=True):  # one step: both ranks' batches
        longest0, longest1 = max(LENGTHS[i] for i in b0), max(LENGTHS[i] for i in b1)
        assert abs(longest0 - longest1) <= 0.2 * max(longest0, longest1) + 5

    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        EpochShuffleSampler(4, 0, lengths=[1, 2, 3])


def _validation_loss(datamodule: TaskDataModule, model: torch.nn.Module) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            losses, _ = target_token_losses(model, batch)
            total, count = total + float(losses.sum()), count + losses.numel()
    return total / count


def test_validation_longest_first_gives_the_same_token_weighted_loss(tmp_path):
    cfg = compose(["experiment=smoke", f"paths.cache_dir={tmp_path}", "task.data.embedded.n_val=40"])
    model, tokenizer = load_model(cfg.model)
    encoder = PromptEncoder(tokenizer, Task.from_config(cfg.task), chat_template=False)
    plain, grouped = (
        TaskDataModule(Task.from_config(cfg.task), encoder, eval_batch_size=8, group_by_length=g)
        for g in (False, True)
    )
    plain.setup(), grouped.setup()
    first = next(iter(grouped.val_dataloader()))["input_ids"]
    assert first.shape[1] == max(len(e.input_ids) for e in grouped.encoded["validation"])
    assert _validation_loss(grouped, model) == pytest.approx(_validation_loss(plain, model), rel=1e-5)


def test_a_grouped_run_resumes_after_a_crash_to_the_same_weights(tmp_path):
    base = [
        "experiment=smoke",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "loader.group_by_length=true",
        "trainer.max_steps=8",
        "trainer.val_check_interval=2",
        "eval.after=false",
        "task.data.embedded.n_train=40",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip  -- 5 batches an epoch: the crash and the resume fall inside the second epoch
    run(compose(base + [f"paths.run_dir={tmp_path / 'whole'}"]))
    crash = ["+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=7"]
    with pytest.raises(RuntimeError, match="simulated crash at step 7"):
        run(compose(base + crash + [f"paths.run_dir={tmp_path / 'resumed'}"]))
    run(compose(base + [f"paths.run_dir={tmp_path / 'resumed'}"]))
    assert (
        read_metrics(tmp_path / "resumed")["train"]["steps"]
        == read_metrics(tmp_path / "whole")["train"]["steps"]
    )
    assert same_exported_weights(tmp_path / "whole", tmp_path / "resumed")


def test_the_reference_key_changes_only_when_the_option_is_on(tmp_path):
    from neft_lab import selection_workflow as workflow

    neft = ["experiment=smoke", "strategy=neft", f"paths.cache_dir={tmp_path}", f"paths.run_dir={tmp_path}"]
    off, on = compose(neft), compose(neft + ["loader.group_by_length=true"])
    saved_before_the_option = compose(neft)
    with open_dict(saved_before_the_option):
        del saved_before_the_option.loader["group_by_length"]
    assert workflow.reference_key(off) == workflow.reference_key(saved_before_the_option)  # caches stay valid
    assert workflow.reference_key(on) != workflow.reference_key(off)  # other batches, other reference
