"""Data sources: the embedded grammar, local files, and the errors bad files get."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neft_lab.data.embedded import embedded_splits
from neft_lab.data.encoding import IGNORE_INDEX, PromptEncoder, TrainCollator
from neft_lab.data.examples import Example
from neft_lab.data.sources import read_jsonl, read_local_split, read_parallel
from neft_lab.data.task import Task
from neft_lab.errors import ConfigError, DataError
from neft_lab.models.tiny import build_tokenizer


def _task(**data) -> Task:
    return Task(
        name="t",
        kind="translation",
        source_lang="zh",
        target_lang="en",
        prompt="Chinese: {source}\nEnglish:",
        metrics=("bleu",),
        max_prompt_tokens=64,
        max_target_tokens=16,
        max_new_tokens=16,
        data=data,
    )


def _write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_embedded_splits_are_seeded_and_disjoint():
    a, b = embedded_splits(300, 20, 20, seed=1), embedded_splits(300, 20, 20, seed=1)
    assert a == b
    assert embedded_splits(300, 20, 20, seed=2)["train"] != a["train"]
    sources = [{e.source for e in a[s]} for s in ("train", "validation", "test")]
    assert sum(map(len, sources)) == 340 and len(set.union(*sources)) == 340
    assert all(e.target.endswith(".") and e.target[0].isupper() for e in a["train"])


def test_embedded_grammar_elides_and_moves_adverbs():
    pairs = {e.source: e.target for e in embedded_splits(2000, 0, 0)["train"]}
    assert any("l'" in t.lower() for t in pairs.values())
    often = [(s, t) for s, t in pairs.items() if " often " in s]
    assert often and all("souvent" in t for _, t in often)


def test_local_parallel_files_are_read_in_order(tmp_path):
    _write(tmp_path, "train.zh", ["你好", "谢谢"])
    _write(tmp_path, "train.en", ["Hello", "Thanks"])
    examples = read_local_split(tmp_path, "train", "zh", "en", "zh", "en")
    assert [(e.source, e.target) for e in examples] == [("你好", "Hello"), ("谢谢", "Thanks")]
    assert examples[1].origin.endswith("train.zh:2")


def test_mismatched_line_counts_name_both_files(tmp_path):
    src, tgt = _write(tmp_path, "a.zh", ["1", "2", "3"]), _write(tmp_path, "a.en", ["1", "2"])
    with pytest.raises(DataError, match=r"a\.zh has 3 lines but .*a\.en has 2"):
        read_parallel(src, tgt)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "train.zh").write_text("")
    _write(tmp_path, "train.en", ["x"])
    with pytest.raises(DataError, match="train.zh is empty"):
        read_local_split(tmp_path, "train", "zh", "en", "zh", "en")


def test_non_utf8_names_line_and_fix(tmp_path):
    (tmp_path / "train.zh").write_bytes("好\n".encode() + "坏".encode("gb18030") + b"\n")
    _write(tmp_path, "train.en", ["good", "bad"])
    with pytest.raises(DataError, match=r"train\.zh line 2, column 1 is not valid UTF-8.*iconv"):
        read_local_split(tmp_path, "train", "zh", "en", "zh", "en")


def test_missing_split_lists_what_is_there(tmp_path):
    _write(tmp_path, "dev.zh", ["x"])
    with pytest.raises(DataError, match=r"expected test\.zh \+ test\.en .* found dev\.zh"):
        read_local_split(tmp_path, "test", "zh", "en", "zh", "en")
    with pytest.raises(DataError, match="does not exist"):
        read_local_split(tmp_path / "nope", "test", "zh", "en", "zh", "en")


def test_jsonl_fields_and_errors(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text(json.dumps({"document": "long text", "summary": "short"}) + "\n")
    assert read_jsonl(good, "document", "summary") == [Example("long text", "short", f"{good} line 1")]
    with pytest.raises(DataError, match="no field 'article'.*source_field"):
        read_jsonl(good, "article", "summary")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "x", "summary": "y"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_jsonl(bad, "document", "summary")


def test_task_holds_out_validation_and_applies_limits(tmp_path):
    _write(tmp_path / "tr", "train.zh", [f"s{i}" for i in range(50)])
    _write(tmp_path / "tr", "train.en", [f"t{i}" for i in range(50)])
    _write(tmp_path / "te", "test.zh", ["a", "b", "c"])
    _write(tmp_path / "te", "test.en", ["A", "B", "C"])
    task = _task(
        train_dir=str(tmp_path / "tr"),
        test_dir=str(tmp_path / "te"),
        source_field="zh",
        target_field="en",
        val_size=10,
        max_test=2,
    )
    splits = task.load_splits(seed=0)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (40, 10, 2)
    assert not {e.source for e in splits["train"]} & {e.source for e in splits["validation"]}
    assert task.load_splits(seed=0) == splits


def test_task_without_data_says_how_to_point_at_files():
    with pytest.raises(ConfigError, match=r"task.data.train_dir=.*train\.zh"):
        _task().load_splits()


def test_prompt_too_long_is_an_error_unless_truncating():
    tokenizer = build_tokenizer()
    long = Example("word " * 200, "x", "train.zh:7")
    with pytest.raises(
        DataError, match=r"train\.zh:7: the prompt is \d+ tokens.*max_prompt_tokens=64.*truncate_source"
    ):
        PromptEncoder(tokenizer, _task()).encode_prompt(long)
    cutting = Task(**{**_task().__dict__, "truncate_source": True})
    ids = PromptEncoder(tokenizer, cutting).encode_prompt(long)
    assert 32 < len(ids) <= 64


def test_loss_mask_covers_target_and_eos_only():
    tokenizer = build_tokenizer()
    encoder = PromptEncoder(tokenizer, _task())
    encoded = encoder.encode_all([Example("猫", "The cat."), Example("狗很好", "The dog is good.")])
    batch = TrainCollator(tokenizer.pad_token_id)(encoded)
    for row, enc in enumerate(encoded):
        labels = batch["labels"][row]
        target = labels[labels != IGNORE_INDEX].tolist()
        assert target == enc.input_ids[enc.prompt_length :]
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]).strip() == ["The cat.", "The dog is good."][row]
        assert int(batch["attention_mask"][row].sum()) == len(enc.input_ids)


def test_own_translation_and_summarization_tasks_name_themselves_and_read_a_named_dev_split(tmp_path):
    """Issue 19 A9: one's own language pair needed task=wmt_de_en with its languages overridden (the run kept the
    name wmt_de_en, the prompt said German) and a validation file named valid.*. task=translation names itself
    after its languages, writes its prompt in them, and reads a validation split of any name."""
    from neft_lab.config import compose

    data = tmp_path / "en-fr"
    for split, n in (("train", 12), ("dev", 3), ("test", 4)):
        _write(data, f"{split}.en", [f"hello {i}" for i in range(n)])
        _write(data, f"{split}.fr", [f"bonjour {i}" for i in range(n)])
    cfg = compose(
        [
            "task=translation",
            "task.source_lang=en",
            "task.target_lang=fr",
            f"task.data.data_dir={data}",
            "task.data.val_split=dev",
        ]
    )
    task = Task.from_config(cfg.task)
    assert task.name == "translation_en_fr" and cfg.experiment_name.startswith("translation_en_fr")
    assert (
        task.format_prompt("hi")
        == "Translate the following text from English to French.\nEnglish: hi\nFrench:"
    )
    splits = task.load_splits()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [12, 3, 4]  # dev.*, not held out
    assert splits["validation"][0].source == "hello 0" and splits["validation"][0].target == "bonjour 0"

    # a code without a known name is used as it is; no languages given: one line saying which to set
    other = compose(
        ["task=translation", "task.source_lang=xx", "task.target_lang=en", f"task.data.data_dir={data}"]
    )
    assert (
        Task.from_config(other.task)
        .format_prompt("a")
        .startswith("Translate the following text from xx to English.")
    )
    with pytest.raises(ConfigError, match="task.source_lang"):
        from neft_lab.validation import validate

        validate(compose(["task=translation", f"task.data.data_dir={data}"]))

    docs = tmp_path / "mynews"
    for split, n in (("train", 5), ("test", 2)):
        (docs).mkdir(exist_ok=True)
        (docs / f"{split}.jsonl").write_text(
            "".join(json.dumps({"document": f"doc {i}", "summary": f"sum {i}"}) + "\n" for i in range(n))
        )
    summ = Task.from_config(
        compose(["task=summarization", f"task.data.data_dir={docs}", "task.data.val_size=1"]).task
    )
    assert summ.name == "summarization_mynews" and summ.kind == "summarization"
    assert "{source}" in summ.prompt and len(summ.load_splits()["train"]) == 4
