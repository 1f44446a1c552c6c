"""`stage=report` (the paper's Table 2 from a folder of runs) and what a run logs to W&B, read back offline."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import read_metrics, run_cli
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.pipeline import run
from neft_lab.report import method_of
from neft_lab.wandb_offline import find_offline_runs, read_offline_run

TINY = [
    "experiment=smoke",
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "eval.before=false",
    "task.data.embedded.n_test=8",
    "trainer.enable_progress_bar=false",
]


def test_wandb_multirun_logs_config_metrics_neurons_and_predictions(tmp_path):
    """Two Hydra jobs → two separate offline W&B runs, each holding what the run logged."""
    done = run_cli(
        [
            "-m",
            *TINY,
            "logger=wandb",
            "strategy=neft",
            "seed=0,1",
            "selection.reference.steps=5",
            "trainer.log_every_n_steps=1",
            "eval.log_predictions=5",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=tmp_path,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    assert "wandb run already in progress" not in printed  # job 2 did not reuse job 1's run
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    offline = find_offline_runs(sweep)
    assert [p.parent.parent.name for p in offline] == ["0", "1"]  # one W&B run per job folder
    runs = [read_offline_run(p) for p in offline]
    assert len({r.run_id for r in runs}) == 2
    for seed, wb in enumerate(runs):
        run_dir = wb.folder.parent.parent
        metrics = read_metrics(run_dir)
        assert wb.exit_code == 0  # wandb.finish() ran for this job
        assert wb.group == "smoke" and wb.name == f"embedded_en_fr-neft-s{seed}"
        assert {"neft", "embedded_en_fr", "selection:cosine", "budget:0.09"} <= set(wb.tags)
        # the whole resolved config (as in <run>/config.yaml), plus the job's overrides
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        assert {k: v for k, v in wb.config.items() if k in saved} == saved
        assert f"seed={seed}" in wb.config["overrides"]
        # losses, learning rate, parameter counts, throughput, peak memory, test metrics
        keys = wb.history_keys
        assert {"train/loss", "val/loss", "train/trainable_parameters", "train/step_seconds_median"} <= keys
        assert {"train/tokens_per_second_median", "train/peak_memory_gib", "test/bleu", "test/chrf"} <= keys
        assert any(k.startswith("lr-") for k in keys)
        assert wb.summary["train/trainable_parameters"] == metrics["trainable_parameters"]
        assert wb.summary["test/chrf"] == pytest.approx(metrics["after"]["chrf"])
        train = metrics["train"]
        assert train["step_seconds_median"] > 0 and train["tokens_per_second_median"] > 0
        assert train["peak_memory_source"] == "ru_maxrss" and train["peak_memory_bytes"] > 2**20
        assert wb.summary["train/peak_memory_gib"] == pytest.approx(train["peak_memory_bytes"] / 2**30)
        # the neuron set: per-matrix counts and the cosine histograms
        per_layer = wb.table("neurons/per_layer")
        assert per_layer["columns"] == ["group", "kind", "layer", "selected", "vectors"]
        assert sum(row[3] for row in per_layer["data"]) == metrics["neuron_vectors"]
        every, chosen = wb.summary["neurons/cosine_all"], wb.summary["neurons/cosine_selected"]
        assert every["_type"] == "histogram" and sum(every["values"]) == sum(r[4] for r in per_layer["data"])
        assert sum(chosen["values"]) == metrics["neuron_vectors"]
        # the first eval.log_predictions predictions, as written to predictions.jsonl
        table = wb.table("test/predictions")
        lines = (run_dir / "predictions.jsonl").read_text().splitlines()[:5]
        expected = [[r["source"], r["reference"], r["prediction"]] for r in map(json.loads, lines)]
        assert table["columns"] == ["source", "reference", "prediction"] and table["data"] == expected


def _train(tmp_path: Path, name: str, *extra: str) -> Path:
    run_dir = tmp_path / "runs" / name
    run(
        compose(
            [
                *TINY,
                "logger=none",
                f"paths.run_dir={run_dir}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                *extra,
            ]
        )
    )
    return run_dir


def test_report_over_strategies_and_seeds(tmp_path):
    for strategy in ("full", "random_neuron"):
        for seed in (0, 1):
            _train(tmp_path, f"{strategy}-{seed}", f"strategy={strategy}", f"seed={seed}", "optim.lr=1e-2")
    _train(tmp_path, "lora-0", "strategy=lora", "seed=0", "optim.lr=1e-2")

    done = run_cli(["stage=report", f"report.dir={tmp_path / 'runs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "report"
    markdown = (out / "table.md").read_text()
    assert markdown in done.stdout  # printed as written
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert lines[0].startswith(
        "| method | embedded_en_fr BLEU | embedded_en_fr chrF | embedded_en_fr test loss | trainable % |"
    )
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == ["Full", "LoRA r=8", "Random 9%"]
    assert "\nBLEU (sacreBLEU): `nrefs:1|case:mixed|eff:no|tok:13a|" in markdown  # which BLEU the cells are
    assert (out / "budget_vs_score.png").stat().st_size > 5000

    # every job is in the table, and each cell is the mean ± std over its runs' metrics.json
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    runs = [read_metrics(p) for p in sorted((tmp_path / "runs").glob("*-*"))]
    assert sum(int(r["runs"]) for r in rows.values()) == len(runs) == 5
    for label, strategy in (("Full", "full"), ("Random 9%", "random_neuron"), ("LoRA r=8", "lora")):
        mine = [m for m in runs if m["strategy"] == strategy]
        assert rows[label]["seeds"] == " ".join(str(m["seed"]) for m in mine)
        for metric in ("bleu", "chrf"):
            values = [m["after"][metric] for m in mine]
            assert float(rows[label][f"embedded_en_fr/{metric}/mean"]) == pytest.approx(
                statistics.mean(values)
            )
            assert int(rows[label][f"embedded_en_fr/{metric}/n"]) == len(values)
            if len(values) > 1:
                std = statistics.stdev(values)
                assert float(rows[label][f"embedded_en_fr/{metric}/std"]) == pytest.approx(std)
                assert f"{statistics.mean(values):.2f} ± {std:.2f} (n=2)" in markdown
        assert float(rows[label]["trainable_percent"]) == pytest.approx(mine[0]["trainable_percent"])
        step = statistics.median(m["train"]["step_seconds_median"] for m in mine)
        assert float(rows[label]["step_seconds_median"]) == pytest.approx(step)


def _fake_run(folder: Path, metrics: dict, **cfg) -> None:
    """A finished run as the report sees it: metrics.json + config.yaml."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))


def test_report_table_shape_labels_and_arithmetic(tmp_path):
    """Translation and summarization columns, the paper's method labels, exact mean ± std."""
    settings = {"optim": {"lr": 1e-4}, "trainer": {"max_steps": 10}, "loader": {"batch_size": 8}}
    methods = [
        ("full", {"name": "none"}, {}, 100.0),
        ("lora", {"name": "none"}, {"r": 16}, 1.5),
        ("neft", {"name": "cosine", "method": "cosine", "budget": {"kind": "share", "value": 0.03}}, {}, 3.0),
        ("neft", {"name": "cosine", "method": "cosine", "budget": {"kind": "share", "value": 0.09}}, {}, 9.0),
        (
            "random_neuron",
            {"name": "random", "method": "random", "budget": {"kind": "share", "value": 0.09}},
            {},
            9.0,
        ),
        (
            "reverse_selection",
            {"name": "reverse", "method": "reverse", "budget": {"kind": "share", "value": 0.09}},
            {},
            9.0,
        ),
        (
            "neft",
            {
                "name": "cosine_plus_reverse",
                "method": "cosine_plus_reverse",
                "reverse_share": 0.03,
                "budget": {"kind": "share", "value": 0.06},
            },
            {},
            9.0,
        ),
    ]
    for i, (strategy, selection, extra, pct) in enumerate(methods):
        for seed, bleu in ((0, 10.0 + i), (1, 14.0 + i)):
            translation = {"bleu": bleu, "chrf": 40.0, "comet": None, "n": 8}
            summary = {"rouge1": 30.0 + seed, "rouge2": 10.0, "rougeL": 25.0, "n": 8}
            for task, kind, after in (
                ("wmt_zh_en", "translation", translation),
                ("xsum", "summarization", summary),
            ):
                _fake_run(
                    tmp_path / f"{i}-{task}-{seed}",
                    {
                        "model": "m",
                        "task": task,
                        "seed": seed,
                        "strategy": strategy,
                        "trainable_percent": pct,
                        "train": {"step_seconds_median": 0.1 * (seed + 1), "peak_memory_bytes": 2**30},
                        "after": after,
                    },
                    task={"kind": kind},
                    strategy={"name": strategy, **extra},
                    selection=selection,
                    **settings,
                )
    _fake_run(tmp_path / "eval-run", {"model": "m", "task": "xsum", "ckpt": "x", "after": {"rougeL": 1.0}})

    run(compose(["stage=report", f"report.dir={tmp_path}", f"report.out={tmp_path / 'out'}"]))
    markdown = (tmp_path / "out" / "table.md").read_text()
    header, _, *body = [line for line in markdown.splitlines() if line.startswith("|")]
    assert markdown.endswith(
        "\nBLEU (sacreBLEU): not recorded (scored before signatures were: cased, tok zh or 13a)\n"
    )
    assert header == (
        "| method | wmt_zh_en BLEU | wmt_zh_en chrF | xsum ROUGE-1 | xsum ROUGE-2 | xsum ROUGE-L "
        "| trainable % | step s (median) | wall min | peak mem GiB | runs |"
    )  # no COMET column: no run computed it; the stage=eval run is left out
    labels = [line.split(" | ")[0].lstrip("| ") for line in body]
    assert labels == [
        "Full",
        "LoRA r=16",
        "NeFT 3%",
        "NeFT 9%",
        "NeFT 6%+Reversed 3%",
        "Random 9%",
        "Reverse 9%",
    ]
    full = body[0].split(" | ")
    assert full[1:4] == ["12.00 ± 2.83 (n=2)", "40.00 ± 0.00 (n=2)", "30.50 ± 0.71 (n=2)"]  # 10,14; 30,31
    assert full[-5:] == ["100", "0.15", "–", "1.00", "4 |"]  # no wall time recorded in these runs
    assert (tmp_path / "out" / "budget_vs_score.png").stat().st_size > 5000
    # report.metric picks the plot's y axis; a metric no run has is an error
    run(
        compose(
            ["stage=report", f"report.dir={tmp_path}", f"report.out={tmp_path / 'o2'}", "report.metric=chrf"]
        )
    )
    with pytest.raises(ConfigError, match="report.metric=comet: no run has it"):
        run(compose(["stage=report", f"report.dir={tmp_path}", "report.metric=comet"]))


def test_report_plot_draws_single_points_inside_sane_limits(tmp_path, monkeypatch):
    """A family with one budget point (LoRA here) is drawn as a marker, and the log x range spans every
    point with a margin instead of collapsing onto the single point (the picture, not just the file)."""
    import numpy as np

    from neft_lab import report as report_module

    figures = []
    save = report_module._atomic_savefig
    monkeypatch.setattr(
        report_module, "_atomic_savefig", lambda fig, path: (figures.append(fig), save(fig, path))[1]
    )
    points = {"Full": (100.0, 20.0), "LoRA": (1.5, 15.0), "NeFT": [(3.0, 16.0), (9.0, 18.0)]}
    for name, strategy, selection, extra, pct, bleu in (
        ("full", "full", {"name": "none"}, {}, 100.0, 20.0),
        ("lora", "lora", {"name": "none"}, {"r": 8}, 1.5, 15.0),
        (
            "neft3",
            "neft",
            {"name": "cosine", "method": "cosine", "budget": {"kind": "share", "value": 0.03}},
            {},
            3.0,
            16.0,
        ),
        (
            "neft9",
            "neft",
            {"name": "cosine", "method": "cosine", "budget": {"kind": "share", "value": 0.09}},
            {},
            9.0,
            18.0,
        ),
    ):
        _fake_run(
            tmp_path / "runs" / name,
            {
                "model": "m",
                "task": "wmt_zh_en",
                "seed": 0,
                "strategy": strategy,
                "trainable_percent": pct,
                "after": {"bleu": bleu, "chrf": 40.0, "n": 8},
            },
            task={"kind": "translation"},
            strategy={"name": strategy, **extra},
            selection=selection,
        )
    run(compose(["stage=report", f"report.dir={tmp_path / 'runs'}", f"report.out={tmp_path / 'out'}"]))
    assert (tmp_path / "out" / "budget_vs_score.png").stat().st_size > 5000
    fig = figures[0]  # the budget plot (convergence.png follows)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    low, high = ax.get_xlim()
    xs = [1.5, 3.0, 9.0, 100.0]
    assert low < min(xs) / 1.2 and high > max(xs) * 1.2  # every point inside, with a margin on the log axis
    fig.canvas.draw()
    box = ax.get_window_extent()

    def drawn_at(x: float, y: float) -> bool:
        """A line with a visible marker through (x, y), itself inside the axes (not clipped to an edge)."""
        px, py = ax.transData.transform((x, y))
        if not (box.x0 + 5 < px < box.x1 - 5 and box.y0 + 5 < py < box.y1 - 5):
            return False
        return any(
            line.get_visible()
            and line.get_marker() not in (None, "None", "", " ", "_", "|")
            and any(
                np.isclose(float(lx), x) and np.isclose(float(ly), y)
                for lx, ly in zip(line.get_xdata(), line.get_ydata())
            )
            for line in ax.lines
        )

    for family, where in points.items():
        for x, y in where if isinstance(where, list) else [where]:
            assert drawn_at(x, y), f"{family} point ({x}, {y}) is not drawn inside the plot"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"Full", "LoRA", "NeFT"} <= set(legend)


def test_method_labels():
    assert (
        method_of({"strategy": "lora", "lora_r": "match", "budget_share": 0.09}).label == "LoRA r=match (9%)"
    )
    neft = {"strategy": "neft", "selection": "cosine", "budget_kind": "lora_rank", "budget_value": 256}
    assert method_of(neft).label == "NeFT ≈LoRA r=256"
    transfer = {"strategy": "neft", "selection_method": "from_file", "neuron_percent": 2.5}
    assert method_of(transfer).label == "NeFT (from file) 2.5%"
    # dense partial fine-tunes are named by what they train (metrics.json "trains"), each its own family
    assert method_of({"strategy": "ft_embed", "trains": ["embed"]}).label == "FT-embed"
    in_out = method_of({"strategy": "ft_in_out", "selection_name": "none", "trains": ["up", "down"]})
    assert (in_out.family, in_out.label) == ("FT-{in,out}", "FT-{in,out}")
    assert method_of({"strategy": "mine", "trains": ["gate", "up", "down"]}).label == "FT-{gate,in,out}"


def test_report_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run(compose(["stage=report", f"report.dir={tmp_path / 'missing'}"]))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no metrics.json found under"):
        run(compose(["stage=report", f"report.dir={tmp_path / 'empty'}"]))
    with pytest.raises(ConfigError, match="needs report.dir"):
        run(compose(["stage=report"]))


def _neft_selection(scorer: str, method: str = "cosine", steps: int = 4, **extra) -> dict:
    """A saved config's selection block, as strategy=neft selection=<scorer> writes it."""
    return {
        "name": scorer,
        "scorer": scorer,
        "method": method,
        "pooling": "global",
        "modules": ["up", "down"],
        "budget": {"kind": "share", "value": 0.09},
        "reverse_share": 0.0,
        "reference": {"steps": steps, "horizon": None},
        **extra,
    }


def test_report_keeps_scorers_and_reference_settings_apart(tmp_path, caplog):
    """Issue 19 A1: four scorers (metrics.json of older runs said "selection": "cosine" for all) were one row
    'NeFT 9% (n=4)' with a warning about repeated seeds; each scorer, pooling, module set and reference K is
    its own method."""
    settings = {"optim": {"lr": 1e-4}, "trainer": {"max_steps": 10}, "loader": {"batch_size": 8}}
    variants = {
        "cos": _neft_selection("cosine"),
        "cos-k8": _neft_selection("cosine", steps=8),
        "grad": _neft_selection("gradient"),
        "lora": _neft_selection("lora_reference"),
        "probe": _neft_selection("probe"),
        "layer": _neft_selection("cosine", pooling="per_layer"),
        "gate": _neft_selection("cosine", modules=["gate", "up", "down"]),
    }
    for i, (name, selection) in enumerate(variants.items()):
        _fake_run(
            tmp_path / name,
            {
                "model": "m",
                "task": "t",
                "seed": 0,
                "strategy": "neft",
                "selection": "cosine",  # what the pipeline wrote for every scorer before
                "trainable_percent": 9.0,
                "after": {"bleu": 10.0 + i, "n": 8},
            },
            task={"kind": "translation"},
            strategy={"name": "neft"},
            selection=selection,
            **settings,
        )
    caplog.set_level("WARNING")
    run(compose(["stage=report", f"report.dir={tmp_path}", f"report.out={tmp_path / 'out'}"]))
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "out" / "table.csv").open())}
    assert all(r["runs"] == "1" for r in rows.values()), rows.keys()
    assert len(rows) == len(variants)
    labels = set(rows)
    assert {"NeFT 9% (K=4)", "NeFT 9% (K=8)"} <= labels  # K shown where the paper's scorer runs differ in it
    assert any("gradient" in label for label in labels)
    assert any("lora_reference" in label for label in labels)
    assert any("probe" in label for label in labels)
    assert any("per_layer" in label for label in labels)
    assert any("gate" in label for label in labels)
    assert "repeated seeds" not in caplog.text

    # two runs of one method with one seed: the warning says how they were counted, as the cell does
    caplog.clear()
    again = tmp_path / "again"
    _fake_run(
        again / "a",
        {"model": "m", "task": "t", "seed": 0, "strategy": "neft", "after": {"bleu": 1.0, "n": 8}},
        task={"kind": "translation"},
        strategy={"name": "neft"},
        selection=_neft_selection("gradient"),
        **settings,
    )
    _fake_run(
        again / "b",
        {"model": "m", "task": "t", "seed": 0, "strategy": "neft", "after": {"bleu": 3.0, "n": 8}},
        task={"kind": "translation"},
        strategy={"name": "neft"},
        selection=_neft_selection("gradient"),
        **settings,
    )
    run(compose(["stage=report", f"report.dir={again}", f"report.out={again / 'out'}"]))
    assert "2.00 ± 1.41 (n=2)" in (again / "out" / "table.md").read_text()
    warning = next(r.getMessage() for r in caplog.records if "seed" in r.getMessage())
    assert "n=2" in warning and "counts once" not in warning


def test_a_run_without_a_recorded_step_time_takes_it_from_its_csv_log(tmp_path):
    """A run resumed under an older neft_lab recorded only its last attempt (no step time when that attempt only
    evaluated): the report takes the median of its logged `train/step_seconds`, the last value per step."""
    from neft_lab.results import collect_runs

    run_dir = tmp_path / "neft" / "seed0"
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"train": {"steps": 4, "step_seconds_median": None}}))
    rows = [
        ("0", "5.0"),
        ("1", "3.0"),
        ("1", "4.0"),
        ("2", "6.0"),
        ("3", "2.0"),
    ]  # step 1 again after a resume
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train/step_seconds", "val/loss"])
        writer.writerows([(step, value, "") for step, value in rows])
    (row,) = collect_runs(tmp_path)
    assert row["train_step_seconds_median"] == pytest.approx(4.5)  # median of 5, 4, 6, 2
    (run_dir / "metrics.json").write_text(json.dumps({"train": {"steps": 4, "step_seconds_median": 7.0}}))
    assert collect_runs(tmp_path)[0]["train_step_seconds_median"] == 7.0  # a recorded value wins


def test_report_warns_when_pooled_runs_trained_differently(tmp_path, caplog):
    """Two seeds of one method, one with batches grouped by length: pooled into one cell, with a warning."""
    for seed, grouped in ((0, False), (1, True)):
        _fake_run(
            tmp_path / f"seed{seed}",
            {"model": "m", "task": "t", "seed": seed, "strategy": "full", "trainable_percent": 100.0,
             "after": {"bleu": 10.0 + seed, "n": 8}},
            task={"kind": "translation"}, strategy={"name": "full"}, selection={"name": "none"},
            optim={"lr": 1e-4}, trainer={"max_steps": 10}, loader={"batch_size": 8, "group_by_length": grouped},
        )  # fmt: skip
    caplog.set_level("WARNING")
    run(compose(["stage=report", f"report.dir={tmp_path}", f"report.out={tmp_path / 'out'}"]))
    warned = [r.getMessage() for r in caplog.records if "pooled into one cell" in r.getMessage()]
    assert len(warned) == 1 and "group_by_length (False, True)" in warned[0]


def test_reading_a_run_waits_until_wandb_has_written_it(tmp_path, monkeypatch):
    """wandb.finish() returns before W&B's service has written the last records (a report's summary was missing
    in 3 of 12 reads right after it): the reader waits for the exit record, and gives up on a log that has
    stopped growing without one (a killed run)."""
    import threading
    import time

    import wandb

    from neft_lab.wandb_offline import find_offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_ = wandb.init(project="p", dir=str(tmp_path / "a"), mode="offline")
    run_.summary.update({"score": 1.5})
    run_.finish()
    (folder,) = find_offline_runs(tmp_path / "a")
    (log,) = folder.glob("run-*.wandb")
    whole = read_offline_run(folder)
    assert whole.exit_code == 0 and whole.summary["score"] == 1.5
    complete = log.read_bytes()

    late = tmp_path / "late" / log.name  # the header now, the records half a second later
    late.parent.mkdir()
    late.write_bytes(complete[:7] + bytes(len(complete) - 7))
    writer = threading.Timer(0.5, lambda: late.write_bytes(complete))
    writer.start()
    try:
        again = read_offline_run(late.parent)
    finally:
        writer.join()
    assert again.exit_code == 0 and again.summary["score"] == 1.5

    killed = tmp_path / "killed" / log.name  # no record will ever come
    killed.parent.mkdir()
    killed.write_bytes(complete[:7] + bytes(100))
    started = time.monotonic()
    assert read_offline_run(killed.parent).exit_code is None and time.monotonic() - started < 5
