"""Instruction tasks (Alpaca-style records) and IFEval scoring: rendering, loss masks, field names, clear errors,
the official checks' verdicts on hand-made responses, and a tiny end-to-end run (task=alpaca_ifeval)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, read_metrics
from neft_lab.data.encoding import IGNORE_INDEX, PromptEncoder, TrainCollator, end_of_turn_ids
from neft_lab.data.task import Task
from neft_lab.errors import ConfigError, DataError
from neft_lab.models.tiny import build_tokenizer
from neft_lab.pipeline import run

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "the cat", "output": "le chat"},
    {"instruction": "Give a synonym of happy.", "input": "", "output": "Glad."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
IFEVAL_ROWS = [
    {"key": 1, "prompt": "Write about cats. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Describe the sea in lowercase letters only.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 3, "prompt": "Write fewer than 3 sentences about dogs without commas.",
     "instruction_id_list": ["length_constraints:number_sentences", "punctuation:no_comma"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}, {}]},
]  # fmt: skip
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a colour.\n\n### Response:"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nTranslate to French.\n\n### Input:\n"
    "the cat\n\n### Response:"
)
# A Gemma-like chat template; its end of turn is a special token of its own.
CHAT = (
    "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _files(tmp_path: Path, train: int = 16) -> list[str]:
    """A tiny Alpaca → IFEval task: train/val instruction records, IFEval test rows."""
    records = [dict(r, output=f"{r['output']} ({i})") for i in range(train // len(RECORDS)) for r in RECORDS]
    return [
        f"task.data.train_file={_jsonl(tmp_path / 'train.jsonl', records)}",
        f"task.data.val_file={_jsonl(tmp_path / 'val.jsonl', RECORDS)}",
        f"task.data.test_file={_jsonl(tmp_path / 'ifeval.jsonl', IFEVAL_ROWS)}",
    ]


def _task(compose_cfg, tmp_path: Path, *overrides: str, scored: bool = False) -> Task:
    """task=alpaca_ifeval on small files; unless `scored`, without the ifeval metric, so that reading and
    rendering need no `ifeval` extra (with it, loading checks the instruction ids with lm-eval's registry)."""
    unscored = [] if scored else ["task.metrics=[]"]
    cfg = compose_cfg(
        ["task=alpaca_ifeval", *_files(tmp_path), f"paths.run_dir={tmp_path}", *unscored, *overrides]
    )
    return Task.from_config(cfg.task)


def _chat_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = CHAT
    return tokenizer


# ---- rendering and loss masks ------------------------------------------------------------------------------
def test_plain_template_is_stanford_alpacas(compose_cfg, tmp_path):
    task = _task(compose_cfg, tmp_path)
    splits = task.load_splits()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [16, 4, 3]
    tokenizer = build_tokenizer()
    encoder = PromptEncoder(tokenizer, task, chat_template="auto")  # the tiny tokenizer has no template
    assert not encoder.chat_template
    plain, with_input = splits["validation"][0], splits["validation"][1]
    assert tokenizer.decode(encoder.encode_prompt(plain)) == "<bos>" + ALPACA_NO_INPUT
    assert tokenizer.decode(encoder.encode_prompt(with_input)) == "<bos>" + ALPACA_INPUT
    assert with_input.source == "Translate to French.\n\nthe cat"  # the user's message: instruction, input
    assert encoder.stop_token_ids == (tokenizer.eos_token_id,)


def test_chat_template_renders_the_user_turn_and_closes_with_end_of_turn(compose_cfg, tmp_path):
    task = _task(compose_cfg, tmp_path)
    tokenizer = _chat_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_ids(tokenizer) == [eot]
    encoder = PromptEncoder(tokenizer, task, chat_template="auto")
    assert encoder.chat_template
    example = task.load_splits()["validation"][1]
    prompt = tokenizer.decode(encoder.encode_prompt(example))
    assert (
        prompt
        == "<start_of_turn>user\nTranslate to French.\n\nthe cat<end_of_turn>\n<start_of_turn>assistant\n"
    )
    target, cut = encoder.encode_target(example.target)
    assert not cut and target[-2:] == [eot, tokenizer.eos_token_id]
    assert tokenizer.decode(target[:-2]) == "le chat"
    assert set(encoder.stop_token_ids) == {eot, tokenizer.eos_token_id}  # generation stops at either


def test_labels_cover_only_the_response_and_its_end(compose_cfg, tmp_path):
    task = _task(compose_cfg, tmp_path)
    tokenizer = build_tokenizer()
    encoder = PromptEncoder(tokenizer, task)
    examples = task.load_splits()["validation"][:2]
    batch = TrainCollator(tokenizer.pad_token_id)(encoder.encode_all(examples))
    for row, example in enumerate(examples):
        prompt_length = len(encoder.encode_prompt(example))
        labels = batch["labels"][row]
        assert (labels[:prompt_length] == IGNORE_INDEX).all()
        learned = [int(t) for t in labels[prompt_length:] if t != IGNORE_INDEX]
        assert tokenizer.decode(learned) == example.target + "<eos>"


def test_long_inputs_are_cut_before_instructions(compose_cfg, tmp_path):
    task = _task(compose_cfg, tmp_path, "task.max_prompt_tokens=160")
    long = task.load_splits()["validation"][1]
    long = type(long)(long.source, long.target, "here", {"instruction": "Translate.", "input": "cat " * 200})
    with pytest.raises(DataError, match="longer than task.max_prompt_tokens=160"):
        PromptEncoder(build_tokenizer(), task).encode_prompt(long)
    cutting = _task(compose_cfg, tmp_path, "task.max_prompt_tokens=160", "task.truncate_source=true")
    tokenizer = build_tokenizer()
    ids = PromptEncoder(tokenizer, cutting).encode_prompt(long)
    assert len(ids) <= 160 and "### Instruction:\nTranslate.\n\n### Input:\ncat cat" in tokenizer.decode(ids)


def test_field_names_map_and_json_arrays_read(compose_cfg, tmp_path):
    rows = [{"q": {"text": r["instruction"]}, "ctx": r["input"] or None, "a": r["output"]} for r in RECORDS]
    (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")  # alpaca_data.json's form
    task = _task(
        compose_cfg,
        tmp_path,
        f"task.data.train_file={tmp_path / 'data.json'}",
        "task.data.instruction_field=q.text",
        "task.data.input_field=ctx",
        "task.data.output_field=a",
        "task.data.val_file=null",
        "task.data.val_size=1",
    )
    splits = task.load_splits()
    by_target = {e.target: e for e in splits["train"] + splits["validation"]}
    assert by_target["le chat"].meta == {"instruction": "Translate to French.", "input": "the cat"}
    assert by_target["Blue."].meta == {"instruction": "Name a colour.", "input": ""}  # null input: none
    no_input = [{"instruction": r["instruction"], "output": r["output"]} for r in RECORDS]
    _jsonl(tmp_path / "plain.jsonl", no_input)
    task = _task(
        compose_cfg,
        tmp_path,
        f"task.data.train_file={tmp_path / 'plain.jsonl'}",
        "task.data.input_field=null",
    )
    assert [e.source for e in task.load_splits()["train"]] == [r["instruction"] for r in RECORDS]


def test_max_test_limits_the_ifeval_rows(compose_cfg, tmp_path):
    test = _task(compose_cfg, tmp_path, "task.data.max_test=2").load_splits()["test"]
    assert [e.meta["key"] for e in test] == [1, 2] and all(e.target == "" for e in test)


# ---- clear errors ------------------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.bad_input
def test_a_missing_field_names_the_setting(compose_cfg, tmp_path):
    _jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "output": "y"}])
    task = _task(compose_cfg, tmp_path, f"task.data.train_file={tmp_path / 'bad.jsonl'}")
    with pytest.raises(DataError) as err:
        task.load_splits()
    message = _one_line(err)
    assert "bad.jsonl line 1 has no field 'instruction' (fields: output, prompt)" in message
    assert "task.data.instruction_field" in message
    _jsonl(tmp_path / "noinput.jsonl", [{"instruction": "x", "output": "y"}])
    task = _task(compose_cfg, tmp_path, f"task.data.train_file={tmp_path / 'noinput.jsonl'}")
    with pytest.raises(DataError, match=r"no field 'input'.*task.data.input_field=null"):
        task.load_splits()


@pytest.mark.bad_input
def test_a_missing_file_names_the_setting(compose_cfg, tmp_path):
    task = _task(compose_cfg, tmp_path, f"task.data.test_file={tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError) as err:
        task.check_folders()
    message = _one_line(err)
    assert f"task.data.test_file={tmp_path / 'nope.jsonl'} does not exist" in message
    assert "IFEval rows" in message
    task = _task(compose_cfg, tmp_path, "task.data.train_file=null")
    with pytest.raises(ConfigError, match=r"no train data: set task.data.train_file="):
        task.load_splits()


@pytest.mark.bad_input
def test_ifeval_rows_without_instruction_ids_say_what_they_need(compose_cfg, tmp_path):
    _jsonl(tmp_path / "alpaca_test.jsonl", RECORDS)  # instruction/input/output rows given as IFEval rows
    task = _task(compose_cfg, tmp_path, f"task.data.test_file={tmp_path / 'alpaca_test.jsonl'}")
    with pytest.raises(DataError) as err:
        task.load_splits()
    message = _one_line(err)
    assert "has no field 'prompt'" in message and "task.data.test_prompt_field" in message
    _jsonl(tmp_path / "ids.jsonl", [{"prompt": "x", "kwargs": [{}]}])
    task = _task(compose_cfg, tmp_path, f"task.data.test_file={tmp_path / 'ids.jsonl'}")
    with pytest.raises(DataError, match="no field 'instruction_id_list'.*test_prompt_field=null"):
        task.load_splits()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task.metrics=[bleu]"], "bleu compare with reference outputs"),
        (["task.data.test_prompt_field=null"], "the ifeval metric scores IFEval test rows"),
        (["task.prompt='Do it:'"], "task.prompt must contain {instruction}"),
        (["task.prompt_with_input='{instruction} {inputs}'"], "must contain {input}"),
        (["task.prompt_with_input='{instruction} {input} {extra}'"], "is not a valid template (KeyError"),
    ],
)
def test_bad_instruction_configs_are_refused(compose_cfg, tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as err:
        _task(compose_cfg, tmp_path, *overrides, scored=True)
    assert expected in _one_line(err)


@pytest.mark.bad_input
def test_ifeval_metric_on_a_translation_task_is_refused(compose_cfg):
    cfg = compose_cfg(["task=wmt_zh_en", "task.metrics=[ifeval]", "paths.run_dir=/tmp/x"])
    with pytest.raises(ConfigError) as err:
        Task.from_config(cfg.task)
    assert "the ifeval metric scores instruction tasks only" in _one_line(err)


@pytest.mark.bad_input
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, compose_cfg, tmp_path, tiny_overrides):
    from neft_lab.evaluation import ifeval

    monkeypatch.setitem(ifeval.REQUIRED, "neft_lab_no_such_module", "no-such-dist")
    cfg = compose_cfg([*tiny_overrides, "task=alpaca_ifeval", *_files(tmp_path)])
    with pytest.raises(ConfigError) as err:
        run(cfg)  # refused by validate(), before any model or data is loaded
    message = _one_line(err)
    assert "no-such-dist" in message and message.endswith("install the extra with pip install -e '.[ifeval]'")


@pytest.mark.bad_input
def test_bad_chat_template_setting_is_refused(compose_cfg, tmp_path, tiny_overrides):
    overrides = ["task=alpaca_ifeval", *_files(tmp_path), "task.metrics=[]", "model.chat_template=maybe"]
    cfg = compose_cfg([*tiny_overrides, *overrides])
    with pytest.raises(ConfigError, match="model.chat_template='maybe': choose true"):
        run(cfg)


# ---- IFEval scoring (the official checks, via lm-eval) -----------------------------------------------------
LOWERCASE = "this answer is written in lowercase english words only, as the instruction asked for."
HAND_MADE = [  # (instruction ids, kwargs, response, strict verdicts, loose verdicts)
    (["punctuation:no_comma"], [{}], "I like cats and dogs and birds.", [True], [True]),
    (["punctuation:no_comma"], [{}], "I like cats, dogs and birds.", [False], [False]),
    (["change_case:english_lowercase"], [{}], LOWERCASE, [True], [True]),
    (["change_case:english_lowercase"], [{}], "This Answer Is Written In Title Case English Words.", [False], [False]),
    (["change_case:english_lowercase"], [{}], "Sure! Here it is:\n" + LOWERCASE, [False], [True]),  # loose: no 1st line
    (["change_case:english_capital"], [{}], "THIS ANSWER IS WRITTEN IN CAPITAL ENGLISH LETTERS ONLY.", [True], [True]),
    # Punkt's English model knows "Dr." is an abbreviation: two sentences, not three
    (["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}],
     "Dr. Smith went home. He slept well.", [True], [True]),
    (["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}], "hello, " + LOWERCASE, [False, True],
     [False, True]),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], "Cats purr. Any other questions?", [True],
     [True]),
    (["punctuation:no_comma"], [{}], "", [False], [False]),  # an empty response follows nothing
]  # fmt: skip


@pytest.fixture(scope="module")
def ifeval():
    pytest.importorskip("lm_eval", reason="the ifeval extra: pip install -e '.[ifeval]'")
    from neft_lab.evaluation import ifeval

    return ifeval


def test_ifeval_verdicts_on_hand_made_responses(ifeval):
    prompts = [
        {"key": i, "prompt": "p", "instruction_id_list": ids, "kwargs": kw}
        for i, (ids, kw, *_) in enumerate(HAND_MADE)
    ]
    metrics, rows = ifeval.score(prompts, [case[2] for case in HAND_MADE])
    for row, (ids, _, response, strict, loose) in zip(rows, HAND_MADE):
        assert (row["ifeval_inst_strict"], row["ifeval_inst_loose"]) == (strict, loose), (ids, response)
        assert row["ifeval_strict"] == all(strict) and row["ifeval_loose"] == all(loose)
        assert row["instruction_id_list"] == ids and "ifeval_error" not in row
    n = len(HAND_MADE)
    strict = [v for case in HAND_MADE for v in case[3]]
    loose = [v for case in HAND_MADE for v in case[4]]
    assert metrics["n"] == n and metrics["ifeval_scorer"].startswith("lm-eval ")
    assert metrics["ifeval_prompt_strict"] == pytest.approx(100 * sum(all(c[3]) for c in HAND_MADE) / n)
    assert metrics["ifeval_prompt_loose"] == pytest.approx(100 * sum(all(c[4]) for c in HAND_MADE) / n)
    assert metrics["ifeval_inst_strict"] == pytest.approx(100 * sum(strict) / len(strict))
    assert metrics["ifeval_inst_loose"] == pytest.approx(100 * sum(loose) / len(loose))
    assert metrics == {**metrics, **ifeval.aggregate(rows)}  # what a bootstrap over rows recomputes


def test_a_check_that_draws_a_random_argument_gives_one_verdict(ifeval):
    """IFEval prompts 1122 and 1129 ask for a letter the official code does not accept ('#', '!'): it draws a
    random letter, afresh for the strict and for the loose check. Scored on the global `random` state, the same
    response would get verdicts that change from run to run, and loose could fail where strict passes."""
    import random

    prompt = {"key": 1122, "prompt": "p", "instruction_id_list": ["keywords:letter_frequency"],
              "kwargs": [{"let_relation": "at least", "letter": "#", "let_frequency": 4}]}  # fmt: skip
    response = (
        "aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm"  # half the alphabet, 4 times
    )
    verdicts = set()
    for seed in range(10):
        random.seed(seed)
        _, rows = ifeval.score([prompt], [response])
        verdicts.add((tuple(rows[0]["ifeval_inst_strict"]), tuple(rows[0]["ifeval_inst_loose"])))
    assert len(verdicts) == 1, verdicts
    ((strict, loose),) = verdicts
    assert strict == loose  # one response line, no markup: the loose variants are the response itself
    state = random.getstate()
    ifeval.score([prompt], [response])
    assert random.getstate() == state  # the caller's random stream is left as it was


def test_punkt_model_is_written_where_nltk_finds_it(ifeval, monkeypatch, tmp_path):
    import nltk
    import punkt
    from nltk.tokenize.punkt import PunktTokenizer

    monkeypatch.setattr(nltk.data, "path", [])  # as on a machine with no nltk_data at all
    folder = ifeval.punkt_data(tmp_path / "nltk_data")
    assert folder == tmp_path / "nltk_data" and nltk.data.path == [str(folder)]
    params, shipped = PunktTokenizer("english")._params, punkt.load_model("english")
    assert params.abbrev_types == shipped.abbrev_types and params.collocations == shipped.collocations
    assert (
        params.sent_starters == shipped.sent_starters and dict(params.ortho_context) == shipped.ortho_context
    )
    assert ifeval.punkt_data(tmp_path / "elsewhere") is None  # found now: nothing more is written


@pytest.mark.bad_input
def test_unknown_instruction_ids_fail_when_the_data_loads(ifeval, compose_cfg, tmp_path):
    _jsonl(
        tmp_path / "typo.jsonl",
        [{"key": 7, "prompt": "x", "instruction_id_list": ["punctuation:no_coma"], "kwargs": [{}]}],
    )
    task = _task(compose_cfg, tmp_path, f"task.data.test_file={tmp_path / 'typo.jsonl'}", scored=True)
    with pytest.raises(DataError) as err:
        task.load_splits()
    assert "typo.jsonl line 1: unknown instruction id(s) ['punctuation:no_coma']" in _one_line(err)


# ---- end to end ----------------------------------------------------------------------------------------------
def test_tiny_alpaca_ifeval_run_writes_ifeval_metrics_and_rows(ifeval, compose_cfg, tmp_path, tiny_overrides):
    cfg = compose_cfg(
        [
            *tiny_overrides,
            "task=alpaca_ifeval",
            *_files(tmp_path),
            "task.max_new_tokens=12",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "loader.batch_size=4",
            "eval.before=true",
        ]
    )
    run(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert metrics["task"] == "alpaca_ifeval" and metrics["train"]["steps"] == 4
    assert metrics["train"]["best_val_loss"] is not None  # training monitors the Alpaca validation loss
    for label in ("before", "after"):
        scores = metrics[label]
        assert scores["n"] == len(IFEVAL_ROWS) and "loss" not in scores  # no references: no test loss
        assert all(0.0 <= scores[name] <= 100.0 for name in ifeval.METRICS)
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [1, 2, 3]
    assert rows[2]["instruction_id_list"] == IFEVAL_ROWS[2]["instruction_id_list"]
    assert len(rows[2]["ifeval_inst_strict"]) == len(rows[2]["ifeval_inst_loose"]) == 2
    assert all(isinstance(r["ifeval_strict"], bool) and isinstance(r["ifeval_loose"], bool) for r in rows)
    assert {k: metrics["after"][k] for k in ifeval.METRICS} == pytest.approx(ifeval.aggregate(rows))


# ---- the real files of ../shared/data ---------------------------------------------------------------------------
@pytest.mark.shared_data
def test_real_alpaca_and_ifeval_files_load(compose_cfg):
    if not (SHARED_DATA / "ifeval" / "input_data.jsonl").is_file():
        pytest.skip(f"no IFEval prompts under {SHARED_DATA}")
    cfg = compose_cfg(
        [
            "task=alpaca_ifeval",
            f"task.data.train_file={SHARED_DATA / 'instruct_alpaca' / 'train.jsonl'}",
            f"task.data.val_file={SHARED_DATA / 'instruct_alpaca' / 'val.jsonl'}",
            f"task.data.test_file={SHARED_DATA / 'ifeval' / 'input_data.jsonl'}",
            "paths.run_dir=/tmp/x",
        ]
    )
    task = Task.from_config(cfg.task)
    task.check_folders()
    pytest.importorskip("lm_eval", reason="the ifeval extra: pip install -e '.[ifeval]'")
    splits = task.load_splits()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [4500, 200, 541]
    assert splits["test"][0].meta["key"] == 1000
    assert sum(len(e.meta["instruction_id_list"]) for e in splits["test"]) == 834
    assert sum(bool(e.meta["input"]) for e in splits["train"]) == 1751


def test_the_ifeval_table_script_runs_on_the_tiny_model(ifeval, tmp_path):
    """scripts/table_ifeval_cpu.sh (Table 4 in small) end to end on the tiny model and a tiny Alpaca / IFEval
    folder laid out as ../shared/data is: the grid, a seed, the IFEval scores and the report with its test."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    data = tmp_path / "data"
    (data / "instruct_alpaca").mkdir(parents=True)
    (data / "ifeval").mkdir()
    records = [dict(r, output=f"{r['output']} ({i})") for i in range(4) for r in RECORDS]
    _jsonl(data / "instruct_alpaca" / "train.jsonl", records)
    _jsonl(data / "instruct_alpaca" / "val.jsonl", RECORDS)
    _jsonl(data / "ifeval" / "input_data.jsonl", IFEVAL_ROWS)
    out = tmp_path / "table"
    env = {**os.environ, "MODEL": "tiny", "METHODS": "random9", "SEEDS": "0", "STEPS": "2", "VAL_EVERY": "2",
           "SEARCH_STEPS": "1", "TEST": "2", "VAL": "3", "MAX_NEW": "8", "PRECISION": "32-true", "DATA": str(data),
           "OUT": str(out), "BASELINE": "Random 9%", "EXTRA": f"paths.cache_dir={tmp_path / 'cache'}",
           "WANDB_MODE": "offline", "NEFT_LAB_ROOT": str(tmp_path)}  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's python
    done = subprocess.run(["bash", str(REPO / "scripts" / "table_ifeval_cpu.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = json.loads((out / "final" / "random9" / "seed0" / "metrics.json").read_text())
    assert metrics["task"] == "alpaca_ifeval" and "ifeval_prompt_strict" in metrics["after"]
    saved = (out / "final" / "random9" / "seed0" / "config.yaml").read_text()
    assert "group_by_length: true" in saved  # Alpaca's long batches: grouped by length, for every method
    table = (out / "final" / "report" / "table.md").read_text()
    assert "| Random 9% |" in table and "ifeval" in table.lower()
