"""The authors' §6 utilization statistic (Krypton808/NeFT, find_neuron/): the streaming implementation against
an independent plain numpy/scipy computation of their formula, and their per-kind Rank, threshold, Avg ΔRank
and Figure 2 buckets on constructed numbers.

Their formula: per layer k, the Hugging Face `output_hidden_states` of generate() without the embedding
output (index k = the output of decoder layer k, the last one after the final norm); per sentence the mean
over its tokens (prompt + greedy output, batch size 1) of the raw hidden state; mean_h_k = the mean over the
sentences; score(w) = max over k >= the vector's layer of |pearsonr(w, mean_h_k)|."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from neft_lab.analysis import compare
from neft_lab.analysis.utilization import Generation, UtilizationTable, generate_sequences, hidden_means
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.geometry import NeuronSpace

SENTENCES = [
    "the cat sleeps on the red chair",
    "a dog",
    "my friend reads a long book in the garden every evening",
    "we eat bread",
    "the small child sees the big house near the river",
]
NEW_TOKENS = 12


def _tiny(seed: int = 0):
    model, tokenizer = build_tiny_model(seed=seed)
    return model.double().eval(), tokenizer


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(s)["input_ids"] for s in SENTENCES]


def _eos(model, tokenizer) -> list[int]:
    """The EOS plus a token the first sentence's greedy output reaches after 3 new tokens, so that sentences
    stop at different steps (a random tiny model rarely emits its EOS)."""
    ids = _ids(tokenizer)[0]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=4,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return [tokenizer.eos_token_id, int(out[0, len(ids) + 3])]


def _authors_scores(model, mean_h: list[np.ndarray]) -> dict[str, np.ndarray]:
    """cal_correlation.py + the visualization's filter: pearsonr per (neuron layer, activation layer) pair,
    pairs with neuron_layer > activation_layer skipped, max |r| over the rest."""
    space = NeuronSpace.from_model(model)
    out = {}
    for group in space.groups:
        weight = model.get_parameter(group.weight).detach().numpy()
        vectors = weight if group.axis == 0 else weight.T
        layers = range(group.layer, len(mean_h))
        out[group.name] = np.array(
            [max(abs(pearsonr(w, mean_h[k]).statistic) for k in layers) for w in vectors]
        )
    return out


def _authors_generated_means(model, tokenizer, prompts: list[list[int]], eos: list[int]) -> list[np.ndarray]:
    """model_infer_and_save_hs.py: generate() one sentence at a time with output_hidden_states, per layer the
    token mean of the concatenated steps (prompt + generated), then the mean over sentences; embedding dropped."""
    per_layer: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=4,
                output_hidden_states=True, return_dict_in_generate=True, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            for i in range(len(out.hidden_states[0])):
                stacked = np.concatenate([step[i].numpy() for step in out.hidden_states], axis=1)
                per_layer.setdefault(i, []).append(stacked.mean(axis=1)[0])
    return [np.mean(per_layer[i], axis=0) for i in sorted(per_layer)][1:]


def _authors_teacher_forced_means(model, prompts: list[list[int]]) -> list[np.ndarray]:
    """The same formula over fixed sentences (one forward pass each, batch size 1, no padding)."""
    per_layer: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            for i, h in enumerate(out.hidden_states):
                per_layer.setdefault(i, []).append(h[0].numpy().mean(axis=0))
    return [np.mean(per_layer[i], axis=0) for i in sorted(per_layer)][1:]


def _authors_settings() -> dict:
    return {"statistic": "mean_state", "layers": "following", "aggregation": "max_abs"}


# ---- the streaming implementation = the authors' formula, exactly ----------------------------------------
def test_streaming_equals_the_authors_pearsonr_over_generated_tokens():
    model, tokenizer = _tiny()
    prompts = _ids(tokenizer)
    eos = _eos(model, tokenizer)
    expected = _authors_scores(model, _authors_generated_means(model, tokenizer, prompts, eos))
    generation = Generation(max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=4, eos_ids=eos)
    table = UtilizationTable.measure(
        model, prompts, tokenizer.pad_token_id, batch_size=3, progress=False, generation=generation,
        **_authors_settings(),
    )  # fmt: skip
    assert table.meta["sentences"] == len(prompts)
    for name, scores in expected.items():
        np.testing.assert_allclose(table.scores[name].numpy(), scores, rtol=0, atol=1e-9)
    # the signed r at the best activation layer is kept for display; the best layer is >= the vector's own
    for group in table.space.groups:
        torch.testing.assert_close(table.signed[group.name].abs(), table.scores[group.name], rtol=0, atol=0)
        assert bool((table.best_layer[group.name] >= group.layer).all())


def test_streaming_equals_the_authors_pearsonr_over_fixed_sentences_with_padding():
    model, tokenizer = _tiny(seed=1)
    prompts = _ids(tokenizer)
    expected = _authors_scores(model, _authors_teacher_forced_means(model, prompts))
    table = UtilizationTable.measure(
        model, prompts, tokenizer.pad_token_id, batch_size=4, progress=False, **_authors_settings()
    )
    for name, scores in expected.items():
        np.testing.assert_allclose(table.scores[name].numpy(), scores, rtol=0, atol=1e-9)


def test_preceding_takes_the_inputs_of_layers_0_to_l():
    """layers=preceding (the paper's text): hidden_states[0..l] (the inputs of layers 0..l), same formula."""
    model, tokenizer = _tiny()
    prompts = _ids(tokenizer)
    per_layer: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for ids in prompts:
            for i, h in enumerate(
                model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            ):
                per_layer.setdefault(i, []).append(h[0].numpy().mean(axis=0))
    mean_h = [np.mean(per_layer[i], axis=0) for i in sorted(per_layer)]
    table = UtilizationTable.measure(
        model, prompts, tokenizer.pad_token_id, batch_size=2, progress=False,
        statistic="mean_state", layers="preceding", aggregation="max_abs",
    )  # fmt: skip
    for group in table.space.groups:
        weight = model.get_parameter(group.weight).detach().numpy()
        vectors = weight if group.axis == 0 else weight.T
        expected = [
            max(abs(pearsonr(w, mean_h[j]).statistic) for j in range(group.layer + 1)) for w in vectors
        ]
        np.testing.assert_allclose(table.scores[group.name].numpy(), expected, rtol=0, atol=1e-9)


# ---- generated tokens: the model's own greedy output, padding never counted ---------------------------------
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_generated_tokens_exclude_padding(pad_is_eos):
    """Batched generation (left-padded) gives each sentence exactly its batch-1 tokens: prompt + the greedy
    output up to (not including) the last generated token, which generate() never feeds back; no padding."""
    model, tokenizer = _tiny()
    prompts = _ids(tokenizer)
    pad = tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id
    generation = Generation(max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=4, eos_ids=_eos(model, tokenizer))
    alone = [generate_sequences(model, [p], pad, generation, batch_size=1)[0] for p in prompts]
    together = generate_sequences(model, prompts, pad, generation, batch_size=5)
    assert together == alone
    new = [len(seq) - len(ids) for ids, seq in zip(prompts, together)]
    assert (
        min(new) < NEW_TOKENS - 1 == max(new)
    )  # some stopped early while others ran on: padding in the batch
    with torch.no_grad():
        for ids, seq in zip(prompts, alone):
            out = model.generate(
                input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=4,
                eos_token_id=generation.eos_ids, pad_token_id=pad, return_dict_in_generate=True,
                output_hidden_states=True,
            )  # fmt: skip
            fed = sum(step[0].shape[1] for step in out.hidden_states)  # the tokens generate() ran through
            assert seq == out.sequences[0, :fed].tolist()
    if not pad_is_eos:
        assert all(tokenizer.pad_token_id not in seq for seq in together)
    space = NeuronSpace.from_model(model)
    one = hidden_means(model, space, alone, pad, batch_size=1, progress=False)
    five = hidden_means(model, space, together, pad, batch_size=5, progress=False)
    assert one.tokens == five.tokens == sum(map(len, alone))
    torch.testing.assert_close(one.means, five.means, rtol=0, atol=1e-12)


# ---- per-kind Rank, threshold, Avg ΔRank, buckets ------------------------------------------------------------
def _space() -> NeuronSpace:
    """Two kinds of unequal size: 4 up vectors and 2 k vectors (k_proj rows) in one layer."""
    shapes = {"model.layers.0.self_attn.k_proj.weight": (2, 8), "model.layers.0.mlp.up_proj.weight": (4, 8)}
    return NeuronSpace.from_shapes("llama", shapes, kinds=("up", "k"))


def _table(space: NeuronSpace, scores: list[float]) -> UtilizationTable:
    values = torch.tensor(scores, dtype=torch.float64).split([g.count for g in space.groups])
    named = dict(zip([g.name for g in space.groups], values))
    best = {n: torch.zeros(len(v), dtype=torch.int32) for n, v in named.items()}
    return UtilizationTable(space, named, best, torch.zeros(1, 8, dtype=torch.float64))


def test_rank_is_per_kind():
    space = _space()  # order: up.0 (4 vectors), k.0 (2 vectors)
    table = _table(space, [0.1, 0.5, 0.4, 0.9, 0.95, 0.2])
    assert table.flat_ranks("per_kind").tolist() == [4, 2, 3, 1, 1, 2]
    assert table.flat_ranks("pooled").tolist() == [6, 3, 4, 2, 1, 5]


def test_threshold_is_a_share_of_the_kind_or_a_count():
    space = _space()
    assert compare.kind_thresholds(0.5, space, "per_kind") == {"up": 2, "k": 1}
    assert compare.kind_thresholds(0.5, space, "pooled") == {"up": 3, "k": 3}
    assert compare.kind_thresholds(2, space, "per_kind") == {"up": 2, "k": 2}
    # Llama-2-7B: 100,000 of a kind's 352,256 vectors
    assert round(compare.PAPER_SHARE * 352_256) == 100_000
    llama = NeuronSpace.from_shapes(
        "llama",
        {f"model.layers.{i}.mlp.{m}_proj.weight": s for i in range(32)
         for m, s in (("up", (11008, 4096)), ("down", (4096, 11008)))},
    )  # fmt: skip
    assert compare.kind_thresholds(compare.PAPER_SHARE, llama, "per_kind") == {"up": 100_000, "down": 100_000}


def test_strongly_affected_and_avg_delta_rank_per_kind():
    space = _space()
    a = _table(space, [0.9, 0.8, 0.7, 0.6, 0.9, 0.8])  # per kind: up 1 2 3 4, k 1 2
    b = _table(space, [0.6, 0.8, 0.7, 0.9, 0.8, 0.9])  # per kind: up 4 2 3 1, k 2 1
    rank_a, rank_b = a.flat_ranks("per_kind"), b.flat_ranks("per_kind")
    thresholds = compare.kind_thresholds(0.5, space, "per_kind")  # up: 2 ranks, k: 1 rank
    out = compare.compare(space, rank_a, rank_b, None, thresholds, ranking="per_kind")
    assert out["counts"]["strongly_affected"] == 4  # up: |±3| >= 2 twice; k: |±1| >= 1 twice
    assert out["per_category"]["strongly_affected"]["per_kind"] == {"up": 2, "k": 2}
    assert out["mean_abs_delta_rank_per_kind"] == {"up": pytest.approx(6 / 4), "k": pytest.approx(1.0)}
    assert out["avg_delta_rank"] == pytest.approx((6 / 4 + 1.0) / 2)  # the mean over kinds, not over vectors
    assert out["mean_abs_delta_rank"] == pytest.approx(8 / 6)
    assert out["threshold_ranks"] == {"up": 2, "k": 1} and out["ranking"] == "per_kind"
    assert out["spearman_per_kind"]["k"] == pytest.approx(-1.0)


def test_trained_and_untrained_vectors_compared_within_each_kind():
    """Issue 18: NeFT's set can be nearly all down vectors and a random set split evenly, so trained vs untrained
    is also reported per kind (counts, mean |ΔRank|, share strongly affected), not only pooled over kinds."""
    space = _space()
    a = _table(space, [0.9, 0.8, 0.7, 0.6, 0.9, 0.8])  # per kind: up 1 2 3 4, k 1 2
    b = _table(space, [0.6, 0.8, 0.7, 0.9, 0.8, 0.9])  # per kind: up 4 2 3 1 (|Δ| 3 0 0 3), k 2 1 (|Δ| 1 1)
    trained = torch.tensor([True, False, False, False, True, False])
    out = compare.compare(
        space,
        a.flat_ranks("per_kind"),
        b.flat_ranks("per_kind"),
        trained,
        {"up": 2, "k": 1},
        ranking="per_kind",
    )
    assert out["trained_per_kind"] == {
        "up": {"trained_vectors": 1, "mean_abs_delta_rank_trained": 3.0, "mean_abs_delta_rank_untrained": 1.0,
               "share_of_trained_strongly_affected": 1.0, "share_of_untrained_strongly_affected": pytest.approx(1 / 3)},
        "k": {"trained_vectors": 1, "mean_abs_delta_rank_trained": 1.0, "mean_abs_delta_rank_untrained": 1.0,
              "share_of_trained_strongly_affected": 1.0, "share_of_untrained_strongly_affected": 1.0},
    }  # fmt: skip
    assert "trained_per_kind" not in compare.compare(
        space, a.flat_ranks("per_kind"), b.flat_ranks("per_kind"), None, {"up": 2, "k": 1}
    )


def test_buckets_by_share_of_the_kinds_max_score():
    """Figure 2: a vector's bucket is its reference score as a percentage of the largest score of its kind."""
    space = _space()
    scores = [0.8, 0.4, 0.02, 0.79, 0.5, 0.25]  # up max 0.8: 100, 50, 2.5, 98.75 %; k max 0.5: 100, 50 %
    a = _table(space, scores)
    rank_a = a.flat_ranks("per_kind")
    delta_b = torch.tensor([1, -1, 2, -2, 0, 0])
    out = compare.compare(
        space, rank_a, rank_a + delta_b, None, {"up": 10, "k": 10}, edges=[0, 3, 50, 97, 100],
        ranking="per_kind", scores_a=a.flat_scores(), bucket_scale="max_score",
    )  # fmt: skip
    assert out["bucket_scale"] == "max_score"
    assert [b["vectors"] for b in out["buckets"]] == [1, 0, 2, 3]
    assert [b["mean_delta_rank"] for b in out["buckets"]] == [2.0, None, -0.5, pytest.approx(-1 / 3)]


def test_percentile_buckets_are_within_the_kinds_ranking():
    space = _space()
    a = _table(space, [0.8, 0.4, 0.02, 0.79, 0.5, 0.25])
    rank_a = a.flat_ranks("per_kind")  # up: 1 3 4 2 → 0, 50, 75, 25 %; k: 1 2 → 0, 50 %
    out = compare.compare(
        space, rank_a, rank_a, None, {"up": 1, "k": 1}, edges=[0, 50, 100], ranking="per_kind"
    )
    assert [b["vectors"] for b in out["buckets"]] == [3, 3]


def test_plots_draw_one_threshold_per_kind():
    """Kinds of unequal size have their own thresholds: the plots draw each (no single number to format)."""
    from neft_lab.analysis import plots

    space = _space()
    a = _table(space, [0.8, 0.4, 0.02, 0.79, 0.5, 0.25])
    b = _table(space, [0.1, 0.4, 0.02, 0.79, 0.2, 0.25])
    ra, rb = a.flat_ranks("per_kind"), b.flat_ranks("per_kind")
    thresholds = compare.kind_thresholds(0.5, space, "per_kind")
    summary = compare.compare(space, ra, rb, None, thresholds, scores_a=a.flat_scores())
    arrays = {"rank_reference": ra, "rank_run": rb, "delta_rank": rb - ra}
    assert summary["threshold_ranks"] == {"up": 2, "k": 1}
    for fig in (
        plots.rank_scatter(arrays, "B", "A", summary["threshold_ranks"]),
        plots.delta_hist(arrays, "B", "A", summary["threshold_ranks"]),
        plots.buckets(summary, "B", "A"),
    ):
        assert fig.axes
