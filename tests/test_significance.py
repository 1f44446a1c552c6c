"""Spread and significance in `stage=report`: the paired bootstrap over test segments (seeds paired), the
report's significance columns and W&B summary, and the convergence curves from the runs' own logs."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from neft_lab.config import compose
from neft_lab.curves import method_curve, validation_curve
from neft_lab.errors import ConfigError
from neft_lab.report import build_table, compare_to_baseline, load_runs, report
from neft_lab.significance import paired_bootstrap, segment_metric

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "fast",
    "in",
    "the",
    "green",
    "park",
    "today",
]


def _references(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=12)) for _ in range(n)]


def _noisy(refs: list[str], p: float, seed: int) -> list[str]:
    """Each reference word replaced by a random one with probability p: higher p, lower BLEU."""
    rng = random.Random(seed)
    return [" ".join(w if rng.random() > p else rng.choice(WORDS) for w in r.split()) for r in refs]


def _rows(hyps: list[str], refs: list[str], losses: list[float] | None = None) -> list[dict]:
    rows = [{"source": f"s{i}", "reference": r, "prediction": h} for i, (h, r) in enumerate(zip(hyps, refs))]
    for row, loss in zip(rows, losses or []):
        row["loss_sum"], row["loss_tokens"] = loss * 10, 10
    return rows


@pytest.mark.parametrize("name", ["bleu", "chrf"])
def test_one_seed_pair_is_sacrebleus_paired_bootstrap(name):
    """With one seed pair the test is sacreBLEU's own paired bootstrap: the same p-value to the last digit."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    refs = _references(150)
    base, other = _noisy(refs, 0.50, 1), _noisy(refs, 0.47, 2)  # close: a p-value between the extremes
    ours = paired_bootstrap(segment_metric(name), [_rows(base, refs)], [_rows(other, refs)])
    metric = BLEU() if name == "bleu" else CHRF()
    _, results = PairedTest(
        [("baseline", base), ("other", other)],
        {name: metric},
        references=[refs],
        test_type="bs",
        n_samples=1000,
    )()
    (baseline, theirs) = next(v for k, v in results.items() if k != "System")  # named sacreBLEU's way
    assert 0.002 < ours.p_value < 0.9  # not a degenerate case
    assert ours.p_value == theirs.p_value
    assert ours.delta == pytest.approx(theirs.score - baseline.score)


def test_finds_a_planted_difference():
    """A method that is better on every seed: significant, the interval excludes 0; the same for the loss."""
    refs = _references(200)
    seeds = range(3)
    base = [_rows(_noisy(refs, 0.6, 10 + s), refs, [3.0 + 0.1 * (i % 5) for i in range(200)]) for s in seeds]
    better = [
        _rows(_noisy(refs, 0.3, 20 + s), refs, [2.7 + 0.1 * (i % 5) for i in range(200)]) for s in seeds
    ]
    for name in ("bleu", "chrf"):
        result = paired_bootstrap(segment_metric(name), base, better)
        assert result.delta > 5 and result.ci_low > 0 and result.p_value < 0.01, result
        assert result.pairs == 3 and result.segments == 200
    loss = paired_bootstrap(segment_metric("loss"), base, better)
    assert loss.delta == pytest.approx(-0.3) and loss.ci_high < 0 and loss.p_value < 0.01


def test_finds_no_difference_between_identical_runs_or_equal_methods():
    refs = _references(200)
    runs = [_rows(_noisy(refs, 0.4, s), refs, [2.0] * 200) for s in range(2)]
    same = paired_bootstrap(segment_metric("bleu"), runs, runs)
    assert same.delta == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0
    assert paired_bootstrap(segment_metric("loss"), runs, runs).p_value == 1.0
    # two methods with the same noise level (only their random draws differ): no significant difference
    equal = [_rows(_noisy(refs, 0.4, 100 + s), refs) for s in range(2)]
    result = paired_bootstrap(segment_metric("bleu"), runs, equal)
    assert result.p_value > 0.05 and result.ci_low < 0 < result.ci_high


def test_pooled_difference_is_the_difference_of_seed_means():
    """Seeds pair i with i; the observed difference is the mean over pairs (= the table's means)."""
    from neft_lab.evaluation.metrics import bleu

    refs = _references(80)
    base = [_noisy(refs, 0.5, s) for s in range(3)]
    other = [_noisy(refs, 0.4, 10 + s) for s in range(3)]
    result = paired_bootstrap(
        segment_metric("bleu"), [_rows(b, refs) for b in base], [_rows(o, refs) for o in other], samples=200
    )
    expected = np.mean([bleu(o, refs) - bleu(b, refs) for b, o in zip(base, other)])
    assert result.delta == pytest.approx(expected)
    assert result.samples == 200
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(segment_metric("bleu"), [_rows(base[0], refs)], [_rows(other[0][:10], refs[:10])])


# ---- the report ------------------------------------------------------------------------------------------
def _run(
    folder: Path, strategy: str, seed: int, rows: list[dict], val: list[tuple[int, float]], **selection
) -> None:
    """A finished run as the report reads it: metrics.json, config.yaml, predictions.jsonl, csv/metrics.csv."""
    from neft_lab.evaluation.metrics import bleu, chrf

    folder.mkdir(parents=True)
    hyps, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    loss = sum(r["loss_sum"] for r in rows) / sum(r["loss_tokens"] for r in rows)
    after = {"loss": loss, "bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), "n": len(rows)}
    metrics = {
        "model": "tiny",
        "task": "wmt_zh_en",
        "seed": seed,
        "strategy": strategy,
        "trainable_percent": 9.0,
    }
    (folder / "metrics.json").write_text(json.dumps({**metrics, "after": after}))
    cfg = {
        "strategy": {"name": strategy},
        "task": {"kind": "translation", "target_lang": "en", "bleu_lowercase": False},
        "selection": selection or {"name": "none"},
        "optim": {"lr": 1e-4},
        "seed": seed,
    }
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "csv").mkdir()
    lines = ["epoch,step,train/loss,val/loss"]
    lines += [f"0,{step - 1},,{value}" for step, value in val]  # Lightning logs at (optimizer steps − 1)
    lines.insert(2, "0,4,2.5,")  # a training row between validations
    (folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


NEFT = {"name": "cosine", "method": "cosine", "budget": {"kind": "share", "value": 0.09}}
RANDOM = {"name": "random", "method": "random", "budget": {"kind": "share", "value": 0.09}}


def _three_methods(root: Path) -> None:
    """NeFT 9% and Full equally good (same noise), Random 9% much worse; 2 seeds each; Full stops early."""
    refs = _references(120)
    for seed in (0, 1):
        losses = [2.0 + 0.05 * (i % 7) for i in range(120)]
        worse = [x + 0.4 for x in losses]
        curve = [(10, 3.0 - 0.1 * seed), (20, 2.6), (30, 2.5)]
        _run(root / f"neft{seed}", "neft", seed, _rows(_noisy(refs, 0.3, seed), refs, losses), curve, **NEFT)
        _run(root / f"full{seed}", "full", seed, _rows(_noisy(refs, 0.3, 50 + seed), refs, losses), curve[:2])
        _run(
            root / f"random{seed}",
            "random_neuron",
            seed,
            _rows(_noisy(refs, 0.7, 90 + seed), refs, worse),
            curve,
            **RANDOM,
        )


def test_report_marks_what_differs_from_the_baseline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _three_methods(tmp_path / "runs")
    cfg = compose(
        [
            "stage=report",
            f"report.dir={tmp_path / 'runs'}",
            "report.baseline=NeFT 9%",
            "report.samples=300",
            "report.wandb=true",
        ]
    )
    report(cfg)
    out = tmp_path / "runs" / "report"
    markdown = (out / "table.md").read_text()
    assert (
        "Paired bootstrap against **NeFT 9%**" in markdown
        and "300 resamples of the 120 test segments" in markdown
    )
    lines = {
        line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")
    }
    random_row = [line for line in markdown.splitlines() if line.startswith("| Random 9% |")]
    assert len(random_row) == 2 and all(
        "*" in line for line in random_row
    )  # main table and significance table
    assert "*" not in lines["Full"].split(" | ", 1)[1].split(" | 100")[0]  # equal quality: not marked
    table = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    by_method = {r["method"]: r for r in table}
    assert (
        float(by_method["Random 9%"]["wmt_zh_en/bleu/p"])
        < 0.05
        < float(by_method["Full"]["wmt_zh_en/bleu/p"])
    )
    assert float(by_method["Random 9%"]["wmt_zh_en/loss/delta"]) == pytest.approx(0.4)
    assert by_method["NeFT 9%"]["wmt_zh_en/bleu/p"] == ""  # the baseline itself
    assert (out / "convergence.png").stat().st_size > 1000
    # the W&B summary of the report run, read back offline
    from neft_lab.wandb_offline import find_offline_runs, read_offline_run

    (wb,) = [read_offline_run(p) for p in find_offline_runs(out)]
    assert wb.summary["Random 9%/wmt_zh_en/bleu/significant"] is True
    assert wb.summary["Full/wmt_zh_en/bleu/significant"] is False
    assert wb.summary["baseline"] == "NeFT 9%"


def test_baseline_by_strategy_name_and_clear_errors(tmp_path):
    _three_methods(tmp_path / "runs")
    table = build_table(load_runs(tmp_path / "runs"))
    assert compare_to_baseline(table, "neft", samples=50).baseline == "NeFT 9%"  # one row uses strategy neft
    assert compare_to_baseline(table, "random 9%", samples=50).baseline == "Random 9%"  # labels in any case
    with pytest.raises(ConfigError, match="no such method here; the methods are: Full, NeFT 9%, Random 9%"):
        compare_to_baseline(table, "LoRA r=8")


def test_baseline_strategy_shared_by_two_methods_is_refused(tmp_path):
    refs = _references(20)
    rows = _rows(_noisy(refs, 0.3, 0), refs, [2.0] * 20)
    _run(tmp_path / "a", "neft", 0, rows, [(10, 2.0)], **NEFT)
    _run(tmp_path / "b", "neft", 0, rows, [(10, 2.0)], **{**NEFT, "budget": {"kind": "share", "value": 0.03}})
    table = build_table(load_runs(tmp_path))
    with pytest.raises(ConfigError, match="2 methods use that strategy .*report.baseline='NeFT 3%'"):
        compare_to_baseline(table, "neft")


def test_curves_one_line_per_method_with_the_logged_steps(tmp_path):
    _three_methods(tmp_path / "runs")
    assert validation_curve(tmp_path / "runs" / "neft0") == [(10, 3.0), (20, 2.6), (30, 2.5)]
    curve = method_curve([tmp_path / "runs" / "neft0", tmp_path / "runs" / "neft1"])
    assert [c[0] for c in curve] == [10, 20, 30]
    assert curve[0][1:] == pytest.approx((2.95, 2.9, 3.0, 2)) and curve[2][4] == 2
    assert [c[0] for c in method_curve([tmp_path / "runs" / "full0"])] == [10, 20]  # stopped early: 2 points

    import matplotlib

    matplotlib.use("Agg")
    from neft_lab.report import plot_convergence

    captured = {}
    import neft_lab.report as report_module

    real = report_module._atomic_savefig

    def keep(fig, path):
        captured["fig"] = fig
        return real(fig, path)

    report_module._atomic_savefig = keep
    try:
        plot_convergence(build_table(load_runs(tmp_path / "runs")), tmp_path / "c.png")
    finally:
        report_module._atomic_savefig = real
    (ax,) = captured["fig"].axes
    lines = {line.get_label(): len(line.get_xdata()) for line in ax.get_lines()}
    assert lines == {"Full (n=2)": 2, "NeFT 9% (n=2)": 3, "Random 9% (n=2)": 3}


def test_ifeval_accuracies_resample_prompts():
    """IFEval rows (per-prompt verdicts): the observed difference is the accuracy difference of
    neft_lab.evaluation.ifeval.aggregate, and a much better method is significant."""
    from neft_lab.evaluation.ifeval import aggregate

    rng = random.Random(0)

    def rows(p: float) -> list[dict]:
        out = []
        for i in range(150):
            inst = [rng.random() < p for _ in range(1 + i % 3)]
            loose = [v or rng.random() < 0.3 for v in inst]
            out.append({"source": f"prompt {i}", "reference": None, "prediction": "...", "ifeval_strict": all(inst),
                        "ifeval_loose": all(loose), "ifeval_inst_strict": inst, "ifeval_inst_loose": loose})  # fmt: skip
        return out

    base, better = rows(0.3), rows(0.8)
    for name in ("ifeval_prompt_strict", "ifeval_prompt_loose", "ifeval_inst_strict", "ifeval_inst_loose"):
        result = paired_bootstrap(segment_metric(name), [base], [better], samples=300)
        assert result.delta == pytest.approx(aggregate(better)[name] - aggregate(base)[name])
        assert result.p_value < 0.01 and result.ci_low > 0


def test_a_p_value_just_under_a_threshold_is_not_shown_at_it():
    from neft_lab.report import p_text

    assert p_text(50 / 1001) == "0.04995"  # 50 of 1,000 resamples: significant at 0.05, and shown so
    assert p_text(1 / 1001) == "0.000999" and p_text(113 / 1001) == "0.113" and p_text(0.05) == "0.050"
