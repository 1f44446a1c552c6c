"""End to end on the real WMT files of ../shared/data (skipped where they are absent)."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA, read_metrics
from neft_lab.config import compose
from neft_lab.data.task import Task
from neft_lab.pipeline import run

pytestmark = pytest.mark.shared_data

LOCAL = [
    f"task.data.train_dir={SHARED_DATA / 'wmt18-20_zh_en_train'}",
    f"task.data.test_dir={SHARED_DATA / 'wmt21_zh_en'}",
]


@pytest.mark.parametrize("task", ["wmt_zh_en", "wmt_en_zh"])
def test_wmt_tasks_train_and_evaluate_from_local_folders(task, tiny_overrides, tmp_path):
    cfg = compose(
        tiny_overrides
        + [
            f"task={task}",
            *LOCAL,
            "task.data.max_train=64",
            "task.data.max_val=8",
            "task.data.max_test=8",
            "task.truncate_source=true",
            "task.max_new_tokens=16",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "loader.batch_size=4",
            "eval.before=false",
        ]
    )
    run(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert metrics["task"] == task and metrics["train"]["steps"] == 4
    assert metrics["after"]["n"] == 8 and 0.0 <= metrics["after"]["bleu"] <= 100.0
    assert metrics["after"]["chrf"] >= 0.0


def test_wmt_files_read_both_directions():
    zh_en = Task.from_config(compose(["task=wmt_zh_en", *LOCAL, "paths.run_dir=/tmp/x"]).task).load_splits()
    en_zh = Task.from_config(compose(["task=wmt_en_zh", *LOCAL, "paths.run_dir=/tmp/x"]).task).load_splits()
    assert (
        zh_en["test"][0].source
        == en_zh["test"][0].target
        == "新华时评：把优秀返乡农民工打造成乡村振兴生力军-新华网"
    )
    assert len(zh_en["test"]) == 500  # task.data.max_test default
    assert len(zh_en["train"]) + len(zh_en["validation"]) == 7379


def test_summarization_jsonl_reads():
    splits = Task.from_config(
        compose(["task=xsum", f"task.data.data_dir={SHARED_DATA / 'xsum'}", "paths.run_dir=/tmp/x"]).task
    ).load_splits()
    assert splits["train"] and splits["test"] and all(e.target for e in splits["test"])
