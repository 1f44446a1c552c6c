"""The paper's probe (§3.1, the authors' probes/ code): ridge classifiers on each layer's mean-pooled residual
hidden states, neuron vectors ranked by |cosine| with the probe directions; its classification data; and the
activation ridge probe that `selection=probe` used to be, kept as `selection=activation_probe`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from neft_lab.config import compose
from neft_lab.data.classification import read_labelled_texts
from neft_lab.errors import ConfigError, DataError
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons import scorers
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.scorers import activation_ridge, probe
from neft_lab.neurons.scorers.probe import probe_scores, residual_states
from neft_lab.validation import validate

FILLER = [" the", " red", " blue", " car", " ball", " never", " watches", " a", " green", " house"]


def _project_out(matrix: torch.Tensor, u: torch.Tensor, side: str) -> None:
    """Remove `u` from what a Linear reads (side="in": its rows) or writes (side="out": its columns)."""
    if side == "in":
        matrix -= torch.outer(matrix @ u, u)
    else:
        matrix -= torch.outer(u, u @ matrix)


def planted_direction_task(
    model: nn.Module,
    tokenizer,
    planted_up: dict[int, list[int]],
    planted_down: dict[int, list[int]],
    seed: int = 0,
) -> tuple[list[str], list[int], torch.Tensor]:
    """Texts labelled by a marker word (" cat" = 1, " dog" = 0), and a model whose residual stream carries the
    label along one random unit direction u and nowhere else; the `planted` up rows and down columns are u.

    The markers' embeddings are b ± u (b ⟂ u, so RMSNorm sees the same norm); no attention or MLP matrix reads u
    and none writes it, so every other direction of every layer's hidden state is label-independent and the
    label stays on u through all layers. The planted up rows read u (their units' down columns are zeroed, so
    that information goes nowhere) and the planted down columns write along u (a label-independent amount,
    scaled by 1e-3); the scorer must rank exactly these vectors first."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    u = torch.randn(hidden, generator=generator)
    u /= u.norm()
    marks = {1: " cat", 0: " dog"}
    marker_ids = {c: tokenizer(w, add_special_tokens=False)["input_ids"] for c, w in marks.items()}
    assert all(len(ids) == 1 for ids in marker_ids.values())
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings -= torch.outer(embeddings @ u, u)
        base = embeddings[marker_ids[1][0]].clone()
        embeddings[marker_ids[1][0]] = base + u
        embeddings[marker_ids[0][0]] = base - u
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)  # RMSNorm's gain must not tilt u
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                _project_out(linear.weight, u, "in")
            for linear in (attention.o_proj, mlp.down_proj):
                _project_out(linear.weight, u, "out")
            for unit in planted_up.get(index, []):
                mlp.up_proj.weight[unit] = 1e-3 * u
                mlp.down_proj.weight[:, unit] = 0
            for unit in planted_down.get(index, []):
                mlp.down_proj.weight[:, unit] = -1e-3 * u  # the sign does not matter: |cos|
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(240):
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), marks[i % 2])
        texts.append("".join(words))
        labels.append(i % 2)
    return texts, labels, u


def test_the_paper_probe_ranks_the_vectors_aligned_with_the_planted_label_direction_first():
    model, tokenizer = build_tiny_model("llama")
    planted_up, planted_down = {0: [5, 77], 1: [20]}, {0: [40], 1: [3, 100]}
    texts, labels, _ = planted_direction_task(model, tokenizer, planted_up, planted_down)
    space = NeuronSpace.from_model(model, ["up", "down"])
    model.train()
    scores = probe_scores(
        model, tokenizer, texts, labels, space, test_examples=40, batch_size=32, progress=False
    )
    assert scores.keys() == {g.name for g in space.groups}
    assert all(scores[g.name].shape == (g.count,) for g in space.groups)
    names = [g.name for g in space.groups]
    flat = torch.cat([scores[name] for name in names])
    offsets = dict(zip(names, np.cumsum([0] + [scores[n].numel() for n in names[:-1]]).tolist()))
    planted = {offsets[f"up.{layer}"] + unit for layer, units in planted_up.items() for unit in units}
    planted |= {offsets[f"down.{layer}"] + unit for layer, units in planted_down.items() for unit in units}
    top = set(flat.topk(len(planted)).indices.tolist())
    assert top == planted  # the pooled ranking (what the global budget takes) starts with them
    others = flat[[i for i in range(flat.numel()) if i not in planted]]
    assert float(flat[list(planted)].min()) > 0.9 and float(others.max()) < 0.3
    assert model.training  # left in the mode it was found (HF's own output-recording hooks are its business)
    assert probe.HIGHER_IS_SELECTED is True and scorers.higher_is_selected("probe") is True


def _plain_states(model: nn.Module, tokenizer, texts: list[str]) -> np.ndarray:
    """[layers, examples, hidden]: HF's hidden_states[1:] (each layer's output), averaged over every token of
    each text run alone (no padding): the independent reference for `residual_states`."""
    rows = []
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            rows.append(torch.stack([h[0].mean(0) for h in out.hidden_states[1:]]))
    return torch.stack(rows, dim=1).double().numpy()


def _authors_scores(states: np.ndarray, labels: np.ndarray, model: nn.Module, test: int, which: str) -> dict:
    """The authors' code, written out: probes/probe_experiment.py (random.seed(1234), 1,000 held out,
    RidgeClassifierCV(alphas=logspace(0.8, 4.1, 12)) per layer, directions = coef_.T), model_composition.py
    (probe_directions[layer][:, 1] of every layer, normalised; get_top_neurons' einsum with the normalised W_in
    rows / W_out columns, |cos|) and data_process.make_neuron_dict (each vector keeps its largest |cos|)."""
    from sklearn.linear_model import RidgeClassifierCV

    random.seed(1234)
    held_out = random.sample(range(len(labels)), test)
    is_test = np.array([i in held_out for i in range(len(labels))])
    probes = []
    for layer_states in states:
        fitted = RidgeClassifierCV(alphas=np.logspace(0.8, 4.1, 12)).fit(
            layer_states[~is_test], labels[~is_test]
        )
        directions = fitted.coef_.T
        probes.append(directions[:, [1]] if which == "class1" else directions)
    learned = torch.tensor(np.concatenate(probes, axis=1).T)  # [probes, hidden]
    learned = learned / learned.norm(dim=1, keepdim=True)
    layers = model.model.layers
    w_in = torch.stack([layer.mlp.up_proj.weight.T for layer in layers]).double()  # TL's W_in [l, d, m]
    w_out = torch.stack([layer.mlp.down_proj.weight.T for layer in layers]).double()  # TL's W_out [l, m, d]
    result = {}
    for kind, w_norm in (
        ("up", (w_in / w_in.norm(dim=1, keepdim=True)).swapaxes(1, 2)),
        ("down", w_out / w_out.norm(dim=-1, keepdim=True)),
    ):
        comp = torch.einsum("lmd,pd->plm", w_norm, learned).abs()  # 'l1 m d, l2 d -> l2 l1 m'
        best = comp.amax(dim=0)
        for layer in range(best.shape[0]):
            result[f"{kind}.{layer}"] = best[layer]
    return result


@pytest.mark.parametrize("which", ["class1", "all"])
def test_the_paper_probe_equals_a_plain_implementation_of_the_authors_code(which):
    model, tokenizer = build_tiny_model("llama", num_layers=3)
    rng = random.Random(3)
    texts = ["".join(rng.choice(FILLER) for _ in range(rng.randint(2, 9))) for _ in range(90)]
    labels = np.array([rng.randrange(3) for _ in texts])  # three classes, as XNLI
    expected_states = _plain_states(model, tokenizer, texts)
    states = residual_states(model, tokenizer, texts, batch_size=7, progress=False)
    assert states.shape == expected_states.shape
    np.testing.assert_allclose(states.double().numpy(), expected_states, rtol=1e-4, atol=1e-5)
    space = NeuronSpace.from_model(model, ["up", "down"])
    scores = probe_scores(
        model, tokenizer, texts, labels.tolist(), space, test_examples=20, directions=which, progress=False
    )
    expected = _authors_scores(expected_states, labels, model, 20, which)
    assert scores.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(scores[name].double(), expected[name], rtol=1e-4, atol=1e-4)


def test_the_paper_probe_scores_any_vector_of_the_residual_stream_and_refuses_others():
    model, tokenizer = build_tiny_model("llama")
    texts = ["a cat", "a dog", "the cat", "the dog", "one cat", "one dog"]
    scores = probe_scores(
        model, tokenizer, texts, [1, 0] * 3, NeuronSpace.from_model(model, ["gate", "o"]), test_examples=2,
        progress=False,
    )  # fmt: skip
    assert set(scores) == {"gate.0", "gate.1", "o.0", "o.1"} and all(
        float(s.max()) <= 1 + 1e-6 for s in scores.values()
    )
    with pytest.raises(ConfigError, match="test_examples=6 .* 6 examples"):
        probe_scores(model, tokenizer, texts, [1, 0] * 3, test_examples=6, progress=False)
    with pytest.raises(ConfigError, match="directions='best'"):
        probe_scores(model, tokenizer, texts, [1, 0] * 3, test_examples=2, directions="best", progress=False)
    with pytest.raises(ConfigError, match="pooling='max'"):
        probe_scores(model, tokenizer, texts, [1, 0] * 3, test_examples=2, pooling="max", progress=False)
    with pytest.raises(ConfigError, match="at least two classes"):
        probe_scores(model, tokenizer, texts, [1] * 6, test_examples=2, progress=False)
    with pytest.raises(ConfigError, match="6 texts but 5 labels"):
        probe_scores(model, tokenizer, texts, [1, 0, 1, 0, 1], test_examples=2, progress=False)


def test_last_token_pooling_takes_each_texts_last_real_token():
    model, tokenizer = build_tiny_model("llama")
    texts = ["a cat watches", "the red ball never"]
    states = residual_states(model, tokenizer, texts, pooling="last", batch_size=2, progress=False)
    with torch.no_grad():
        for row, text in enumerate(texts):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
            torch.testing.assert_close(
                states[:, row], torch.stack([h[0, -1] for h in hidden]), rtol=1e-4, atol=1e-5
            )


# ---------------------------------------------------------------------------------------------
# classification data (JSONL {"text", "label"}; the user supplies XNLI)


def _write(path, rows) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def test_labelled_texts_read_fields_templates_and_label_names(tmp_path):
    plain = _write(
        tmp_path / "a.jsonl",
        [{"text": "x", "label": 0}, {"text": "y", "label": 2}, "", {"text": "z", "label": 1}],
    )
    data = read_labelled_texts(plain, key="selection.probe.file")
    assert data.texts == ["x", "y", "z"] and data.labels == [0, 2, 1]
    assert read_labelled_texts(plain, key="k", max_examples=2).texts == ["x", "y"]
    xnli = _write(
        tmp_path / "xnli.jsonl",
        [{"premise": "A man.", "hypothesis": "A person.", "gold": "entailment"},
         {"premise": "A dog.", "hypothesis": "A cat.", "gold": "contradiction"}],
    )  # fmt: skip
    template = 'sentence1:"{premise}"\nsentence2:"{hypothesis}"\nWhat is the relationship between these two sentences?'
    data = read_labelled_texts(
        xnli,
        key="k",
        label_field="gold",
        template=template,
        label_names=["entailment", "neutral", "contradiction"],
    )
    assert data.labels == [0, 2]
    assert (
        data.texts[0]
        == 'sentence1:"A man."\nsentence2:"A person."\nWhat is the relationship between these two sentences?'
    )


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        (None, {}, r"selection\.probe\.file=.*missing\.jsonl does not exist.*JSON lines"),
        (['{"text": "a", "label": 0}', "{not json"], {}, r"line 2 is not valid JSON"),
        ([[1, 2]], {}, r"line 1 is a JSON list, expected an object"),
        ([{"sentence": "a", "label": 0}], {}, r"has no field 'text'.*selection\.probe\.text_field"),
        ([{"text": "a", "y": 0}], {}, r"has no field 'label'.*selection\.probe\.label_field"),
        (
            [{"text": "a", "label": "neutral"}],
            {},
            r"label 'neutral' is not an integer.*selection\.probe\.label_names",
        ),
        (
            [{"text": "a", "label": "maybe"}],
            {"label_names": ["yes", "no"]},
            r"label 'maybe' is not one of \['yes', 'no'\]",
        ),
        ([{"text": "a", "label": True}], {}, r"label True is not an integer"),
        ([{"text": 3, "label": 0}], {}, r"field 'text' is int, expected text"),
        (
            [{"text": "a", "label": 0}],
            {"template": "{premise} {hypothesis}"},
            r"no field 'premise'.*template",
        ),
        (
            [{"text": "a", "label": 0}, {"text": "b", "label": 0}],
            {},
            r"every example has the label 0.*two classes",
        ),
        ([""], {}, r"holds no records|is empty"),
    ],
)
def test_labelled_texts_refuse_what_a_user_can_fix(tmp_path, rows, options, message):
    path = str(tmp_path / "missing.jsonl") if rows is None else _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=message):
        read_labelled_texts(path, key="selection.probe.file", **options)


# ---------------------------------------------------------------------------------------------
# configs: selection=probe is the paper's probe, selection=activation_probe the former one


@pytest.mark.bad_input
def test_the_paper_probe_needs_the_users_classification_file(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"selection\.probe\.file is not set.*XNLI.*JSON lines"):
        validate(compose([*tiny_overrides, "stage=score", "selection=probe"]))
    with pytest.raises(ConfigError, match=r"selection\.probe\.file=.*nope\.jsonl"):
        validate(
            compose(
                [
                    *tiny_overrides,
                    "stage=score",
                    "selection=probe",
                    f"selection.probe.file={tmp_path}/nope.jsonl",
                ]
            )
        )
    bad = _write(tmp_path / "p.jsonl", [{"text": "a", "label": 0}])
    for setting, message in [
        ("selection.probe.directions=best", "selection.probe.directions"),
        ("selection.probe.pooling=max", "selection.probe.pooling"),
        ("selection.probe.test_examples=-1", "selection.probe.test_examples"),
        ("selection.probe.alphas=[0]", "selection.probe.alphas"),
        ("selection.probe.max_examples=1", "selection.probe.max_examples"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(
                compose(
                    [
                        *tiny_overrides,
                        "stage=score",
                        "selection=probe",
                        f"selection.probe.file={bad}",
                        setting,
                    ]
                )
            )


def test_the_paper_probe_selects_its_highest_scores_and_keys_its_cache(tiny_overrides, tmp_path):
    from neft_lab import selection_workflow as workflow
    from neft_lab.neurons import scores_file
    from neft_lab.neurons.neuron_set import NeuronSet
    from neft_lab.pipeline import run

    rng = random.Random(0)
    rows = [{"text": "".join(rng.choice(FILLER) for _ in range(4)), "label": i % 3} for i in range(30)]
    data = _write(tmp_path / "nli.jsonl", rows)
    base = [
        *tiny_overrides,
        "selection=probe",
        f"selection.probe.file={data}",
        "selection.probe.test_examples=6",
    ]
    cfg = compose(base)
    assert cfg.selection.scorer == "probe" and workflow.scorer_of(cfg) == "probe"
    key = workflow.scores_key(cfg)
    assert (
        key["scorer"] == "probe"
        and key["probe"]["directions"] == "class1"
        and key["probe"]["pooling"] == "mean"
    )
    assert workflow.scores_key(compose([*base, "selection.probe.directions=all"])) != key
    run(compose([*base, "stage=select", f"selection.out={tmp_path / 'p'}"]))
    chosen = NeuronSet.load(tmp_path / "p.safetensors")
    assert chosen.meta["scorer"] == "probe" and chosen.num_vectors > 0
    (found,) = sorted((tmp_path / "cache").glob("scores/probe-*/scores.safetensors"))
    values, _ = scores_file.load(found)
    picked = torch.cat([values[k][i] for k, i in chosen.indices.items()])
    rest = [values[k][[j for j in range(v.numel()) if j not in set(chosen.indices.get(k, torch.tensor([])).tolist())]]
            for k, v in values.items()]  # fmt: skip
    assert picked.min() >= torch.cat(rest).max()  # the largest |cos| first


def test_the_former_probe_is_selection_activation_probe(tiny_overrides):
    from neft_lab import selection_workflow as workflow

    cfg = compose([*tiny_overrides, "selection=activation_probe"])
    assert cfg.selection.scorer == "activation_ridge" and workflow.scorer_of(cfg) == "activation_ridge"
    assert (
        cfg.selection.activation_ridge.file is None
        and int(cfg.selection.activation_ridge.max_examples) == 512
    )
    # no file: source-vs-target language of the task's pairs, as before
    validate(compose([*tiny_overrides, "stage=score", "selection=activation_probe"]))
    assert scorers.higher_is_selected("activation_ridge") is activation_ridge.HIGHER_IS_SELECTED is True
    key = workflow.scores_key(cfg)
    assert key["scorer"] == "activation_ridge" and "activation_ridge" in key and "probe" not in key
