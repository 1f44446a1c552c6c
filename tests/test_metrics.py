"""Metric wrappers: perfect hypotheses score 100, the zh tokenizer is used for Chinese, COMET degrades cleanly."""

from __future__ import annotations

import builtins
import logging

import pytest

from neft_lab.evaluation.generate import cut_at_stop
from neft_lab.evaluation.metrics import bleu, bleu_tokenizer, chrf, comet, rouge, score

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
    assert set(out) == {"n", "bleu", "chrf", "rouge1", "rouge2", "rougeL"} and out["n"] == 2
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
