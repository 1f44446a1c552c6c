"""stage=analyze (the paper's §6): utilization, Rank, ΔRank, neuron categories, overlap, plots, notebook.

Hand-built cases where the answer is known, then the whole stage through the CLI on tiny runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from neft_lab.analysis import compare, overlap
from neft_lab.analysis.artifacts import load_analysis
from neft_lab.analysis.utilization import UtilizationTable, hidden_means, ranks
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.pipeline import run

SENTENCES = [
    "the cat sleeps on the red chair",
    "a dog",
    "my friend reads a long book in the garden every evening",
    "we eat bread",
    "the small child sees the big house near the river",
]


def _tiny(seed: int = 0):
    model, tokenizer = build_tiny_model(seed=seed)
    return model.double().eval(), tokenizer


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(s)["input_ids"] for s in SENTENCES]


OURS = {"statistic": "token_mean", "layers": "preceding", "aggregation": "max"}  # neft_lab's earlier default


def _measure(model, tokenizer, batch_size: int = 2, **settings) -> UtilizationTable:
    """The token-mean statistic over the inputs of layers 0..l unless `settings` say otherwise."""
    return UtilizationTable.measure(
        model, _ids(tokenizer), tokenizer.pad_token_id, batch_size=batch_size, progress=False,
        **{**OURS, **settings},
    )  # fmt: skip


# ---- utilization on hand-built models ------------------------------------------------------------------
def test_a_vector_aligned_with_the_hidden_states_has_correlation_one_and_rank_one():
    model, tokenizer = _tiny()
    with torch.no_grad():
        e = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        model.model.embed_tokens.weight[:] = e  # every token enters as the same vector: h_0 = e everywhere
        model.get_parameter("model.layers.0.mlp.up_proj.weight")[7] = (
            3 * e + 2
        )  # Pearson ignores scale and shift
    table = _measure(model, tokenizer)
    assert table.scores["up.0"][7].item() == pytest.approx(1.0, abs=1e-12)
    assert table.best_layer["up.0"][7].item() == 0
    assert table.rank["up.0"][7].item() == 1 and table.kind_rank["up.0"][7].item() == 1
    others = torch.cat([s for name, s in table.scores.items() if name != "up.0"] + [table.scores["up.0"][:7]])
    assert others.max() < 0.9  # random vectors of width 64 are far from it


@pytest.mark.parametrize("authors", [False, True])
def test_swapping_two_neurons_swaps_their_ranks(authors):
    """Neurons i and j of layer 0 trade places (gate and up rows, down columns): the model computes the same
    function, so the two swap scores and ranks and nothing else moves (either statistic)."""
    model, tokenizer = _tiny()
    settings = {"statistic": "mean_state", "layers": "following", "aggregation": "max_abs"} if authors else {}
    before = _measure(model, tokenizer, **settings)
    i, j = 3, 90
    with torch.no_grad():
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            weight = model.get_parameter(f"model.layers.0.mlp.{name}.weight")
            weight.index_copy_(dim, torch.tensor([i, j]), weight.index_select(dim, torch.tensor([j, i])))
    after = _measure(model, tokenizer, **settings)
    for group in ("up.0", "down.0"):
        assert after.rank[group][i] == before.rank[group][j] and after.rank[group][j] == before.rank[group][i]
        assert after.scores[group][i].item() == pytest.approx(before.scores[group][j].item(), abs=1e-12)
    untouched = [k for k in range(128) if k not in (i, j)]
    for group in before.rank:
        keep = untouched if group in ("up.0", "down.0") else list(range(128))
        assert torch.equal(after.rank[group][keep], before.rank[group][keep])


def test_streaming_means_equal_the_per_token_computation():
    """The running sums of normalised states give exactly the mean over tokens of per-token Pearson
    correlations (computed here token by token from output_hidden_states), then the max over layers."""
    model, tokenizer = _tiny()
    table = _measure(model, tokenizer, batch_size=3)
    states = []
    with torch.no_grad():
        for ids in _ids(tokenizer):
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            states.append([h[0] for h in out.hidden_states])
    assert table.meta["tokens"] == sum(len(ids) for ids in _ids(tokenizer))
    for group in table.space.groups:
        weight = model.get_parameter(group.weight).detach()
        vectors = weight if group.axis == 0 else weight.T
        per_layer = []
        for layer in range(group.layer + 1):
            hidden = torch.cat([s[layer] for s in states])  # [tokens, d]
            corr = torch.corrcoef(torch.cat([vectors, hidden]))[: len(vectors), len(vectors) :]
            per_layer.append(corr.mean(dim=1))
        expected = torch.stack(per_layer, dim=1).max(dim=1).values
        torch.testing.assert_close(table.scores[group.name], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("statistic", ["token_mean", "mean_state"])
@pytest.mark.parametrize("layers", ["preceding", "following"])
def test_batch_size_and_padding_do_not_change_the_result(statistic, layers):
    model, tokenizer = _tiny()
    space = NeuronSpace.from_model(model)
    one, five = (
        hidden_means(
            model,
            space,
            _ids(tokenizer),
            tokenizer.pad_token_id,
            batch_size=size,
            progress=False,
            statistic=statistic,
            layers=layers,
        )  # fmt: skip
        for size in (1, 5)
    )
    assert one.tokens == five.tokens == sum(len(ids) for ids in _ids(tokenizer))
    assert one.sentences == five.sentences == len(SENTENCES)
    torch.testing.assert_close(one.means, five.means, rtol=0, atol=1e-12)


# ---- ΔRank, categories, buckets, overlap on constructed numbers -----------------------------------------
def _space() -> NeuronSpace:
    shapes = {"model.layers.0.mlp.up_proj.weight": (4, 8), "model.layers.0.mlp.down_proj.weight": (8, 4)}
    return NeuronSpace.from_shapes("llama", shapes)


def _flat_ranks(scores: list[float], space: NeuronSpace) -> torch.Tensor:
    """Pooled ranks (one ranking over both kinds)."""
    values = torch.tensor(scores, dtype=torch.float64).split([g.count for g in space.groups])
    by_group = ranks(dict(zip([g.name for g in space.groups], values)), space.groups)
    return torch.cat([by_group[g.name] for g in space.groups])


def test_ranks_are_descending_and_ties_keep_the_space_order():
    space = _space()
    assert _flat_ranks([0.1, 0.5, 0.5, 0.9, 0.0, -0.2, 0.5, 0.3], space).tolist() == [6, 2, 3, 1, 7, 8, 4, 5]


def test_delta_rank_and_categories_of_a_constructed_pair():
    space = _space()  # vectors 0-3: up.0, 4-7: down.0
    rank_a = _flat_ranks([8, 7, 6, 5, 4, 3, 2, 1], space)
    rank_b = _flat_ranks([9 - r for r in (6, 2, 3, 4, 5, 8, 7, 1)], space)
    assert rank_a.tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and rank_b.tolist() == [6, 2, 3, 4, 5, 8, 7, 1]
    trained = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    threshold = compare.threshold_ranks(0.375, 8)  # a share of all vectors: 3 ranks
    assert threshold == 3 == compare.threshold_ranks(3, 8)
    out = compare.compare(space, rank_a, rank_b, trained, threshold, edges=[0, 25, 50, 100], ranking="pooled")
    assert compare.delta_ranks(rank_a, rank_b).tolist() == [5, 0, 0, 0, 0, 2, 0, -7]
    assert out["counts"] == {"strongly_affected": 2, "suppressed": 1, "promoted": 1, "indirectly_affected": 1}
    assert out["per_category"]["strongly_affected"]["per_kind"] == {"up": 1, "down": 1}
    assert out["per_category"]["suppressed"]["per_layer"] == {"up": [1], "down": [0]}
    assert out["per_category"]["indirectly_affected"]["per_kind"] == {"up": 0, "down": 1}
    assert out["mean_abs_delta_rank"] == pytest.approx(14 / 8) and out["mean_delta_rank"] == 0
    assert out["mean_delta_rank_trained"] == pytest.approx(3.5) and out["trained_vectors"] == 2
    assert [b["mean_delta_rank"] for b in out["buckets"]] == [2.5, 0.0, -1.25]
    assert [b["vectors"] for b in out["buckets"]] == [2, 2, 4]
    full = compare.compare(
        space, rank_a, rank_b, torch.ones(8, dtype=torch.bool), threshold, ranking="pooled"
    )
    assert full["counts"]["indirectly_affected"] == 0  # everything trained: nothing is indirectly affected
    unknown = compare.compare(space, rank_a, rank_b, None, threshold, ranking="pooled")
    assert unknown["counts"]["indirectly_affected"] is None


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [0, -0.1, "abc", True, float("nan")])
def test_threshold_must_be_a_share_or_a_count(value):
    with pytest.raises(ConfigError, match="analysis.threshold"):
        compare.threshold_ranks(value, 100)


@pytest.mark.bad_input
@pytest.mark.parametrize("edges", [[0, 50], [1, 50, 100], [0, 50, 40, 100], "0,100"])
def test_buckets_must_rise_from_0_to_100(edges):
    with pytest.raises(ConfigError, match="analysis.buckets"):
        compare.check_buckets(edges)


def test_overlap_of_a_set_with_itself_is_one_and_with_a_disjoint_set_zero():
    space = _space()
    a = NeuronSet(space, {"up.0": torch.tensor([0, 1])})
    b = NeuronSet(space, {"down.0": torch.tensor([0, 1])})
    c = NeuronSet(space, {"up.0": torch.tensor([1, 2])})
    assert overlap.iou(a, a) == 1.0 and overlap.overlap_min(a, a) == 1.0
    assert overlap.iou(a, b) == 0.0 and overlap.overlap_min(a, b) == 0.0
    assert overlap.iou(a, c) == pytest.approx(1 / 3) and overlap.overlap_min(a, c) == 0.5
    m = overlap.matrices({"a": a, "b": b, "c": c})
    assert [m["iou"][i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert m["intersection"][0] == [2, 0, 1] and m["sizes"] == [2, 2, 2]
    assert overlap.per_layer(a)["selected"] == {"up": [2], "down": [0]}


# ---- the stage, end to end on tiny runs --------------------------------------------------------------------
TINY = [
    "experiment=smoke",
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "eval.before=false",
    "eval.after=false",
    "task.data.embedded.n_test=8",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "budget=0.05",
]
FAST = [
    "analysis.max_sentences=8",
    "analysis.max_new_tokens=8",
]  # the analysis: 8 sentences, 8 new tokens each


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny NeFT run, its reference run (a full fine-tune of the same length) and a random-neuron run."""
    root = tmp_path_factory.mktemp("analysis")
    cache = root / "cache"
    folders = {}
    for name, strategy in (("neft", "neft"), ("random", "random_neuron")):
        folders[name] = root / "runs" / name
        run(
            compose(
                [
                    *TINY,
                    f"strategy={strategy}",
                    f"paths.run_dir={folders[name]}",
                    f"paths.cache_dir={cache}",
                    "selection.reference.keep=full",
                ]
            )
        )
    # the NeFT reference run: full FT, 10 steps (keep=full: its whole model stays, not only the scored matrices)
    (folders["full"],) = (cache / "neft").glob("*/reference")
    folders["root"], folders["cache"] = root, cache
    return folders


@pytest.fixture(scope="module")
def analyzed(tiny_runs) -> Path:
    """`python -m neft_lab stage=analyze` over the three runs, W&B offline (the default logger)."""
    runs = ",".join(str(tiny_runs[k]) for k in ("neft", "full", "random"))
    done = run_cli(
        ["stage=analyze", f"analysis.runs=[{runs}]", *FAST, "analysis.batch_size=3",
         f"paths.cache_dir={tiny_runs['cache']}", "trainer.enable_progress_bar=false"],
        cwd=tiny_runs["root"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NeFT 5% vs base: mean |ΔRank|" in done.stdout + done.stderr
    return tiny_runs["neft"] / "analysis"


def test_stage_analyze_writes_tables_summaries_and_plots(tiny_runs, analyzed):
    analysis = load_analysis(analyzed)
    assert analysis.reference == "base" and analysis.runs == ["NeFT 5%", "Full", "Random 5%"]
    base = analysis.table("base")
    n = base.num_vectors
    assert n == 2 * 2 * 128 and sorted(base.flat_ranks().tolist()) == list(range(1, n + 1))
    assert base.meta["sentences"] == 8 and base.meta["tokens"] > 8
    # the defaults are the authors': their statistic on each model's own greedy output, ranks per kind
    assert base.meta["statistic"] == "mean_state" and base.meta["layers"] == "following"
    assert base.meta["aggregation"] == "max_abs" and base.meta["generated"] is True
    per_kind = base.flat_ranks("per_kind")
    for kind in ("up", "down"):
        ranks_of_kind = torch.cat([base.kind_rank[g.name] for g in base.space.groups if g.kind == kind])
        assert sorted(ranks_of_kind.tolist()) == list(range(1, n // 2 + 1))
    threshold = round(0.283884 * (n // 2))  # a share of each kind's 256 vectors
    for label in analysis.runs:
        summary, arrays = analysis.comparison(label), analysis.comparison_arrays(label)
        delta = arrays["delta_rank"]
        assert torch.equal(delta, arrays["rank_run"] - arrays["rank_reference"])
        assert torch.equal(arrays["rank_reference"], per_kind)
        strong = delta.abs() >= threshold
        trained = arrays["trained"].bool()
        assert summary["threshold_ranks"] == threshold and summary["ranking"] == "per_kind"
        assert summary["bucket_scale"] == "max_score" and len(summary["buckets"]) == 10
        kinds = summary["mean_abs_delta_rank_per_kind"]
        assert summary["avg_delta_rank"] == pytest.approx((kinds["up"] + kinds["down"]) / 2)
        assert summary["counts"]["strongly_affected"] == int(strong.sum())
        assert summary["counts"]["suppressed"] == int((strong & (delta > 0)).sum())
        assert summary["counts"]["indirectly_affected"] == int((strong & ~trained).sum())
        per_layer = summary["per_category"]["strongly_affected"]["per_layer"]
        assert sum(map(sum, per_layer.values())) == int(strong.sum())
        # the run folder holds its own summary against its base model, for stage=report
        own = json.loads((Path(summary["run_dir"]) / "analysis" / "summary.json").read_text())
        assert own["mean_abs_delta_rank"] == summary["mean_abs_delta_rank"]
    full = analysis.comparison("Full")
    assert full["trained_vectors"] == n and full["counts"]["indirectly_affected"] == 0
    assert full["counts"]["strongly_affected"] > 0  # 10 steps at lr 3e-3 move a tiny model's ranking
    neft_set = NeuronSet.load(tiny_runs["neft"] / "neuron_set.safetensors")
    assert analysis.comparison("NeFT 5%")["trained_vectors"] == neft_set.num_vectors
    overlap_data = json.loads((analyzed / "overlap.json").read_text())
    assert overlap_data["labels"] == ["NeFT 5%", "Random 5%"] and overlap_data["iou"][0][0] == 1.0
    figures = {p.name for p in (analyzed / "figures").glob("*.png")}
    for stem in ("rank_scatter", "delta_rank_hist", "categories_per_layer", "buckets"):
        assert {f"{stem}_NeFT_5pct.png", f"{stem}_Full.png", f"{stem}_Random_5pct.png"} <= figures
    assert {
        "runs_delta_rank.png",
        "runs_categories.png",
        "utilization_per_layer.png",
        "overlap.png",
    } <= figures
    assert all((analyzed / "figures" / f).stat().st_size > 5000 for f in figures)


def test_stage_analyze_reproduces_the_authors_formula(tiny_runs, analyzed):
    """`stage=analyze` with its defaults gives the base model the scores of a plain transcription of the
    authors' code (generate() one sentence at a time with output_hidden_states, per-sentence token means,
    scipy's pearsonr per vector and layer, max |r| over the layers k >= l) on the same test sentences."""
    from neft_lab.analysis.inputs import split_sequences
    from neft_lab.analysis.runs import load_base_model, read_run, run_config
    from neft_lab.data.task import Task
    from test_authors_statistic import _authors_scores  # the transcription of the authors' code

    cfg = compose(["stage=analyze", f"analysis.runs=[{tiny_runs['neft']}]", "paths.run_dir=unused"])
    run_ = read_run(tiny_runs["neft"])
    model, tokenizer = load_base_model(cfg, run_)
    model = model.double().eval()
    data_cfg = run_config(cfg, run_)
    prompts = split_sequences(Task.from_config(data_cfg.task), tokenizer, "test", 8, "generated",
                              data_cfg.model.chat_template, cfg.seed)  # fmt: skip
    eos = sorted({tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])})  # fmt: skip
    per_layer: dict[int, list] = {}
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=8, no_repeat_ngram_size=4,
                output_hidden_states=True, return_dict_in_generate=True, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            for i in range(len(out.hidden_states[0])):
                stacked = torch.cat([step[i] for step in out.hidden_states], dim=1)
                per_layer.setdefault(i, []).append(stacked[0].mean(dim=0).numpy())
    mean_h = [sum(v) / len(v) for _, v in sorted(per_layer.items())][1:]
    expected = _authors_scores(model, mean_h)
    base = load_analysis(analyzed).table("base")
    for name, scores in expected.items():  # the stage ran the float32 model in batches of 3: float32 noise
        torch.testing.assert_close(base.scores[name], torch.tensor(scores), rtol=0, atol=1e-6)


def test_stage_analyze_logs_the_plots_to_wandb(analyzed):
    from neft_lab.wandb_offline import find_offline_runs, read_offline_run

    (folder,) = find_offline_runs(analyzed)
    wb = read_offline_run(folder)
    assert wb.exit_code == 0
    assert wb.summary["analysis/Full/indirectly_affected"] == 0
    assert "analysis/rank_scatter_NeFT_5pct" in wb.history_keys
    assert any(folder.glob("files/media/images/analysis/rank_scatter_NeFT_5pct*.png"))


def test_a_second_call_reuses_the_tables_and_another_threshold_changes_the_counts(
    tiny_runs, analyzed, caplog
):
    out = tiny_runs["root"] / "again"
    (out / "utilization").mkdir(parents=True)
    for file in (analyzed / "utilization").iterdir():
        (out / "utilization" / file.name).write_bytes(file.read_bytes())
    cfg = compose([f"analysis.runs=[{tiny_runs['neft']},{tiny_runs['full']}]", "stage=analyze", "logger=none",
                   *FAST, "analysis.threshold=20", "analysis.ranking=pooled", f"analysis.out={out}",
                   "trainer.enable_progress_bar=false", "paths.run_dir=unused"])  # fmt: skip
    with caplog.at_level("INFO"):
        run(cfg)
    assert caplog.text.count("reusing") == 3  # base, NeFT, Full: nothing measured again
    again = load_analysis(out).comparison("Full")
    assert again["threshold_ranks"] == 20 and again["ranking"] == "pooled"
    assert torch.equal(load_analysis(out).comparison_arrays("Full")["rank_reference"],
                       load_analysis(analyzed).table("base").flat_ranks("pooled"))  # fmt: skip
    assert (
        again["counts"]["strongly_affected"]
        > load_analysis(analyzed).comparison("Full")["counts"]["strongly_affected"]
    )


def test_another_statistic_is_measured_again_not_reused(tiny_runs, analyzed, caplog):
    """The cache key covers the statistic's settings: ours (token_mean over the inputs of layers 0..l) on the
    same models and sentences measures every table again."""
    out = tiny_runs["root"] / "ours"
    (out / "utilization").mkdir(parents=True)
    for file in (analyzed / "utilization").iterdir():
        (out / "utilization" / file.name).write_bytes(file.read_bytes())
    with caplog.at_level("INFO"):
        run(compose([f"analysis.runs=[{tiny_runs['full']}]", "stage=analyze", "logger=none", *FAST,
                     "analysis.statistic=token_mean", "analysis.layers=preceding", "analysis.aggregation=max",
                     f"analysis.out={out}", "trainer.enable_progress_bar=false", "paths.run_dir=unused"]))  # fmt: skip
    assert "reusing" not in caplog.text
    base = load_analysis(out).table("base")
    assert (base.meta["statistic"], base.meta["layers"], base.meta["aggregation"]) == (
        "token_mean",
        "preceding",
        "max",
    )
    assert not torch.equal(base.flat_scores(), load_analysis(analyzed).table("base").flat_scores())


def test_a_run_as_the_reference(tiny_runs, analyzed):
    """NeFT against its random twin: ranked against the random run's model; the NeFT run's own summary
    (against its base model, read by stage=report) is left as it was."""
    own = tiny_runs["neft"] / "analysis" / "summary.json"
    before = own.read_text()
    out = tiny_runs["root"] / "twin"
    run(compose([f"analysis.runs=[{tiny_runs['neft']}]", f"analysis.base={tiny_runs['random']}", "stage=analyze",
                 "logger=none", *FAST, f"analysis.out={out}", "paths.run_dir=unused",
                 "trainer.enable_progress_bar=false"]))  # fmt: skip
    analysis = load_analysis(out)
    assert analysis.reference == "Random 5% (reference)" and analysis.runs == ["NeFT 5%"]
    twin = analysis.table("Random 5% (reference)")
    arrays = analysis.comparison_arrays("NeFT 5%")
    assert torch.equal(arrays["rank_reference"], twin.flat_ranks("per_kind"))
    assert torch.equal(twin.flat_ranks(), load_analysis(analyzed).table("Random 5%").flat_ranks())
    assert own.read_text() == before


def test_a_lora_run_is_merged_and_counts_as_training_every_vector(tiny_runs):
    lora = tiny_runs["root"] / "runs" / "lora"
    run(compose([*TINY, "strategy=lora", "optim.lr=1e-2", f"paths.run_dir={lora}",
                 f"paths.cache_dir={tiny_runs['cache']}"]))  # fmt: skip
    run(compose([f"analysis.runs=[{lora}]", "stage=analyze", "logger=none", *FAST,
                 "paths.run_dir=unused", "trainer.enable_progress_bar=false"]))  # fmt: skip
    summary = load_analysis(lora / "analysis").comparison("LoRA r=8")
    assert summary["trained_vectors"] == 512 and summary["counts"]["indirectly_affected"] == 0
    assert summary["mean_abs_delta_rank"] > 0  # the adapter was merged in: the ranking moved


def test_report_shows_the_analysis_columns(tiny_runs, analyzed):
    done = run_cli(["stage=report", f"report.dir={tiny_runs['root'] / 'runs'}"], cwd=tiny_runs["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert {"mean abs ΔRank", "strongly affected", "suppressed", "indirectly affected"} <= set(header)
    row = dict(
        zip(
            header,
            [c.strip() for c in next(li for li in lines if li.startswith("| NeFT")).strip("|").split("|")],
        )
    )
    summary = json.loads((tiny_runs["neft"] / "analysis" / "summary.json").read_text())
    assert float(row["mean abs ΔRank"]) == pytest.approx(summary["mean_abs_delta_rank"], rel=1e-2)
    assert row["strongly affected"] == str(summary["counts"]["strongly_affected"])


def test_notebook_reproduces_the_plots(analyzed, tmp_path):
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "neuron_analysis.ipynb", as_version=4)
    os.environ.update(NEFT_LAB_ANALYSIS=str(analyzed), NEFT_LAB_ANALYSIS_FIGURES=str(tmp_path / "figures"))
    try:
        nbclient.NotebookClient(
            notebook, timeout=120, resources={"metadata": {"path": str(REPO / "notebooks")}}
        ).execute()
    finally:
        for key in ("NEFT_LAB_ANALYSIS", "NEFT_LAB_ANALYSIS_FIGURES"):
            os.environ.pop(key)
    drawn = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert drawn == {p.name for p in (analyzed / "figures").glob("*.png")}
    assert all((tmp_path / "figures" / name).stat().st_size > 5000 for name in drawn)
    table = notebook.cells[2]["outputs"][-1]["data"]["text/plain"]
    assert "NeFT 5%" in table and "Random 5%" in table


# ---- refused before any model is loaded --------------------------------------------------------------------
def _analyze(*overrides: str) -> None:
    run(compose(["stage=analyze", "logger=none", "paths.run_dir=unused", *overrides]))


@pytest.mark.bad_input
def test_a_missing_run_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"analysis.runs: run folder {tmp_path / 'nope'} does not exist"):
        _analyze(f"analysis.runs=[{tmp_path / 'nope'}]")
    with pytest.raises(ConfigError, match="needs analysis.runs"):
        _analyze()


@pytest.mark.bad_input
def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a run folder"):
        _analyze(f"analysis.runs=[{tmp_path / 'empty'}]")


@pytest.mark.bad_input
def test_a_neuron_set_of_another_model_is_refused(tiny_runs, tmp_path):
    other, _ = build_tiny_model(hidden_size=32, intermediate_size=64)
    space = NeuronSpace.from_model(other)
    foreign = NeuronSet(space, {g.name: torch.tensor([0, 1]) for g in space.groups}).save(
        tmp_path / "foreign"
    )
    with pytest.raises(
        ConfigError, match=r"neuron set.*foreign.*does not fit|this neuron set was chosen for"
    ):
        _analyze(
            f"analysis.runs=[{tiny_runs['neft']}]", f"analysis.sets=[{foreign}]"
        )  # against the run's set
    with pytest.raises(ConfigError, match="this neuron set was chosen for"):  # against the loaded base model
        _analyze(f"analysis.runs=[{tiny_runs['full']}]", f"analysis.sets=[{foreign}]",
                 f"analysis.out={tmp_path / 'out'}", "analysis.max_sentences=2")  # fmt: skip
    with pytest.raises(ConfigError, match="analysis.sets: neuron set .*missing.* does not exist"):
        _analyze(
            f"analysis.runs=[{tiny_runs['full']}]", f"analysis.sets=[{tmp_path / 'missing.safetensors'}]"
        )


def test_the_gemma_analysis_page_quotes_the_tables_its_script_makes():
    """docs/analysis_gemma_wmt.md's tables at the authors' threshold are, row for row, what
    scripts/analysis_gemma_wmt_tables.py makes from the committed JSON summaries."""
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "scripts/analysis_gemma_wmt_tables.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    authors = done.stdout.split("### Movement, 1% of a kind's ranking")[0]
    rows = [line for line in authors.splitlines() if line.startswith(("| NeFT", "| Random", "| Full"))]
    assert len(rows) == 3 + 4
    page = (REPO / "docs" / "analysis_gemma_wmt.md").read_text()
    missing = [row for row in rows if row not in page]
    assert not missing, missing
