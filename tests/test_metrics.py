"""Metric wrappers: perfect hypotheses score 100, the zh tokenizer is used for Chinese, COMET degrades cleanly,
BLEU can ignore case (task.bleu_lowercase) and always says which BLEU it is (metrics.json, stage=report)."""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import pytest

from neft_lab.config import compose
from neft_lab.data.task import Task
from neft_lab.errors import ConfigError
from neft_lab.evaluation.evaluate import format_metrics
from neft_lab.evaluation.generate import cut_at_stop
from neft_lab.evaluation.metrics import bleu, bleu_tokenizer, bleu_with_signature, chrf, comet, rouge, score
from neft_lab.pipeline import run

REFS = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog."]


def test_perfect_hypothesis_scores_100():
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert chrf(REFS, REFS) == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in rouge(REFS, REFS).values())


def test_wrong_hypothesis_scores_low():
    assert bleu(["completely unrelated words here"] * 2, REFS) < 5
    assert rouge(["zebra"] * 2, REFS)["rouge1"] == 0.0


def test_chinese_targets_use_the_zh_tokenizer():
    assert bleu_tokenizer("zh") == "zh" and bleu_tokenizer("en") == "13a"
    refs, hyps = ["我们今天去公园散步。"], ["我们今天去公园。"]
    # without word segmentation, 13a sees one "word" per sentence and gives 0
    assert bleu(hyps, refs, "zh") > 30
    assert bleu(hyps, refs, "en") == 0.0
    assert rouge(hyps, refs, "zh")["rouge1"] > 80


def test_score_dispatches_every_metric():
    out = score(["bleu", "chrf", "rouge"], REFS, REFS, REFS, "en")
    assert set(out) == {"n", "bleu", "bleu_signature", "chrf", "rouge1", "rouge2", "rougeL"} and out["n"] == 2
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score(["bleu"], REFS, REFS, REFS[:1], "en")


def test_comet_without_package_is_skipped_with_the_fix(monkeypatch, caplog):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "comet":
            raise ImportError("no comet")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with caplog.at_level(logging.WARNING):
        assert comet(["s"], ["p"], ["r"], "Unbabel/wmt22-comet-da") is None
    assert "neft_lab[comet]" in caplog.text


def test_cut_at_stop():
    assert cut_at_stop(" Le chat.\nEnglish: more", ("\n",)) == "Le chat."
    assert cut_at_stop("no stop ", ()) == "no stop"


def test_lowercase_bleu_ignores_case_and_says_so():
    shouted = ["The CAT sat on the MAT.", "A Quick Brown Fox jumps over the lazy DOG."]  # REFS up to case
    cased, cased_sig = bleu_with_signature(shouted, REFS)
    lowered, lowered_sig = bleu_with_signature(shouted, REFS, lowercase=True)
    assert lowered == pytest.approx(100.0) and cased < 60
    assert bleu(shouted, REFS, lowercase=True) == lowered and bleu(shouted, REFS) == cased
    assert "case:mixed" in cased_sig and "case:lc" in lowered_sig
    assert "tok:13a" in cased_sig and "nrefs:1" in cased_sig
    assert "tok:zh" in bleu_with_signature(["我们"], ["我们"], "zh", lowercase=True)[1]


def test_score_records_which_bleu_it_computed():
    shouted = [r.upper() for r in REFS]
    out = score(["bleu", "chrf"], REFS, shouted, REFS, "en", bleu_lowercase=True)
    assert out["bleu"] == pytest.approx(100.0) and "case:lc" in out["bleu_signature"]
    assert "case:mixed" in score(["bleu"], REFS, shouted, REFS, "en")["bleu_signature"]
    assert "bleu_signature" not in score(["chrf"], REFS, REFS, REFS, "en")  # no BLEU, no signature
    shown = format_metrics({**out, "seconds": 1.0})
    assert "bleu=100.00" in shown and "case:" not in shown  # the log line shows scores only


@pytest.mark.parametrize("task", ["wmt_zh_en", "xsum", "embedded"])
def test_task_bleu_lowercase_setting(task):
    assert Task.from_config(compose([f"task={task}"]).task).bleu_lowercase is False  # cased by default
    assert Task.from_config(compose([f"task={task}", "task.bleu_lowercase=true"]).task).bleu_lowercase is True
    with pytest.raises(ConfigError, match="task.bleu_lowercase must be true or false, got 'yes'"):
        Task.from_config(compose([f"task={task}", "task.bleu_lowercase=yes"]).task)


def _run(folder: Path, task: str, signature: str | None) -> None:
    """A finished translation run as the report reads it."""
    folder.mkdir(parents=True)
    after = {"bleu": 20.0, "chrf": 50.0, "n": 8, **({"bleu_signature": signature} if signature else {})}
    metrics = {
        "model": "m",
        "task": task,
        "seed": 0,
        "strategy": "full",
        "trainable_percent": 100.0,
        "after": after,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text("task: {kind: translation}\nstrategy: {name: full}\n")


def test_report_states_the_bleu_signature(tmp_path, caplog):
    lowered = bleu_with_signature(REFS, REFS, "en", lowercase=True)[1]
    cased_zh = bleu_with_signature(REFS, REFS, "zh")[1]
    _run(tmp_path / "one" / "a", "wmt_de_en", lowered)
    _run(tmp_path / "one" / "b", "wmt_de_en", lowered)
    run(compose(["stage=report", f"report.dir={tmp_path / 'one'}"]))
    markdown = (tmp_path / "one" / "report" / "table.md").read_text()
    assert markdown.endswith(f"|\n\nBLEU (sacreBLEU): `{lowered}`\n")  # one line under the table

    _run(tmp_path / "one" / "c", "wmt_en_zh", cased_zh)
    _run(tmp_path / "one" / "d", "wmt_de_en", None)  # an older run: no signature recorded
    with caplog.at_level(logging.WARNING, logger="neft_lab.report"):
        run(compose(["stage=report", f"report.dir={tmp_path / 'one'}"]))
    note = (tmp_path / "one" / "report" / "table.md").read_text().split("|\n\n")[-1]
    assert note.splitlines() == [
        "BLEU (sacreBLEU): the runs used different signatures:",
        "- not recorded (scored before signatures were: cased, tok zh or 13a): wmt_de_en (1 run)",
        f"- `{lowered}`: wmt_de_en (2 runs)",
        f"- `{cased_zh}`: wmt_en_zh (1 run)",
    ]
    assert "the BLEU of wmt_de_en pools runs scored differently" in caplog.text
    assert "wmt_en_zh pools" not in caplog.text  # one signature per task is fine
