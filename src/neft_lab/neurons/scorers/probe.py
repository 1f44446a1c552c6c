"""The paper's probe (§3.1, Table 1): ridge classifiers on each layer's residual hidden states, and every neuron
vector scored by its |cosine| with the probe directions.

What the authors' code does (Krypton808/NeFT: probes/save_activations.py, probes/probe_experiment.py,
probes/model_composition.py, probes/data_process.py), step by step, and what this module does:

1. **Hidden states.** Every text (the XNLI prompt, BOS first) runs through the frozen model; the states kept are
   Hugging Face's ``hidden_states[1:]``: the output of each decoder layer (the embedding output is dropped; the
   last one is after the final norm), one per layer. They are averaged over the text's tokens
   (``activation_aggregation='mean'``, what their result files use; ``last`` = the last token, the other option
   of their code). Theirs were stored in float16 and re-quantised to 8 bits per channel before the fit; ours
   stay float32.
2. **Probes.** Per layer, scikit-learn's ``RidgeClassifierCV(alphas=np.logspace(0.8, 4.1, 12))`` (their grid for
   Llama-2-7B), fitted on every example except 1,000 held out (``random.seed(1234); random.sample(range(n),
   1000)``); the held-out accuracy is only reported. Labels are one-vs-rest ±1 targets (one column for two
   classes); the penalty is the one with the least mean squared leave-one-out error; the intercept is not
   penalised. Here the same estimator is solved in closed form in float64 (one SVD per layer, exact
   leave-one-out errors for every penalty) so that scikit-learn, which this project does not depend on, is
   needed only by the test that checks the two agree (`tests/test_probe.py`).
3. **Directions.** Their selection uses ``probe_directions[layer][:, 1]``, the second class's one-vs-rest
   weight vector (XNLI: 1 = neutral; with two classes, the one direction), of every layer (``start_layer=0``),
   each normalised: ``directions=class1``. The paper's text says only "the probe decision space";
   ``directions=all`` uses every class's direction.
4. **Cosines.** ``get_top_neurons`` normalises every W_in row (TransformerLens' W_in = ``up_proj``; W_gate =
   ``gate_proj``) and W_out column (``down_proj``) and takes |cos| with every probe direction of every layer:
   a vector of layer l1 meets the probes of all layers l2, not only its own. ``make_neuron_dict`` then keeps,
   per vector, its largest |cos| (the first of its entries in descending order), pools in- and out-vectors and
   takes the top 100,000. Here a vector's score is that largest |cos|; the global pooling of the selection
   then takes the same vectors. (Their lists kept only the top 150,000 (probe layer, vector) entries per kind
   before de-duplicating, which can only drop vectors far below the budget; we keep all.)

Any vector that lives in the residual stream can be scored: up/gate rows and down columns (the paper's), and
q/k/v rows and o columns. Direction: HIGH = aligned with the label = selected first (`HIGHER_IS_SELECTED`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.seeded_random import seeded_random

logger = logging.getLogger(__name__)

HIGHER_IS_SELECTED = True  # a vector aligned with a probe direction = sensitive to the task
POOLINGS = ("mean", "last")  # mean: the authors' runs (and the paper's text); last: their code's other option
# class1: the authors' code (probe_directions[:, 1]); all: every class's direction
DIRECTIONS = ("class1", "all")
AUTHORS_ALPHAS = tuple(float(10 ** (0.8 + 3.3 * i / 11)) for i in range(12))  # np.logspace(0.8, 4.1, 12)
AUTHORS_TEST_EXAMPLES = 1000
AUTHORS_SPLIT_SEED = 1234


@dataclass(frozen=True)
class LayerProbe:
    """One layer's ridge classifier: its weight vectors [columns, hidden] (one per class; one for two classes)."""

    layer: int
    coef: torch.Tensor
    intercept: torch.Tensor
    alpha: float
    classes: tuple[int, ...]
    train_accuracy: float
    test_accuracy: float | None

    def directions(self, which: str) -> torch.Tensor:
        """The probe directions the scores use, [k, hidden]: the second class's (`class1`) or all."""
        if which == "all":
            return self.coef
        return self.coef[-1:] if self.coef.shape[0] == 1 else self.coef[1:2]


def _check_choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: choose one of {list(allowed)} (selection.probe.{name})")


def residual_states(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pooling: str = "mean",
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> torch.Tensor:
    """[layers, examples, hidden]: each decoder layer's output (HF ``hidden_states[1:]``) pooled over each text.

    Texts are tokenized one by one as the tokenizer does by default (Llama: BOS first), truncated to `max_length`
    tokens and right-padded; `pooling` averages the real tokens (`mean`) or takes the last one (`last`). The
    model runs in eval mode without gradients and is left as it was found.
    """
    _check_choice(pooling, POOLINGS, "pooling")
    if not len(texts):
        raise ConfigError("the probe got no texts: give labelled examples of the task (selection.probe.file)")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks: list[torch.Tensor] = []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc="probe hidden states", disable=not progress):
                encoded = [
                    tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                    for text in texts[start : start + batch_size]
                ]
                if not all(encoded):
                    raise ConfigError(
                        f"a text among examples {start}..{start + batch_size - 1} has no tokens"
                    )
                width = max(len(ids) for ids in encoded)
                input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for row, ids in enumerate(encoded):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    mask[row, : len(ids)] = 1
                out = model(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    output_hidden_states=True,
                    use_cache=False,
                )
                states = torch.stack(out.hidden_states[1:]).float().cpu()  # [layers, batch, tokens, hidden]
                if pooling == "mean":
                    weights = mask.float() / mask.sum(1, keepdim=True)
                    chunks.append(torch.einsum("lbth,bt->lbh", states, weights))
                else:
                    last = mask.sum(1) - 1
                    chunks.append(states[:, torch.arange(len(encoded)), last])
    finally:
        model.train(was_training)
    return torch.cat(chunks, dim=1)


def held_out(count: int, test_examples: int, seed: int = AUTHORS_SPLIT_SEED) -> torch.Tensor:
    """The authors' split: ``random.seed(seed); random.sample(range(count), test_examples)`` → a test mask."""
    if test_examples < 0 or test_examples >= count:
        raise ConfigError(
            f"test_examples={test_examples} held out of {count} examples leaves none to fit: the authors hold out "
            "1,000 of the XNLI set; lower selection.probe.test_examples or give more examples"
        )
    with seeded_random(seed):
        chosen = random.sample(range(count), test_examples)
    mask = torch.zeros(count, dtype=torch.bool)
    mask[chosen] = True
    return mask


def fit_ridge_classifier(
    features: torch.Tensor, labels: torch.Tensor, alphas: Sequence[float] = AUTHORS_ALPHAS
) -> tuple[torch.Tensor, torch.Tensor, float, tuple[int, ...]]:
    """scikit-learn's ``RidgeClassifierCV(alphas)`` fitted to (features, labels) (efficient leave-one-out, default
    scoring): (coef [columns, hidden], intercept [columns], chosen alpha, classes), in float64."""
    labels = torch.as_tensor(labels).reshape(-1)
    classes, index = torch.unique(labels, return_inverse=True)
    if classes.numel() < 2:
        raise ConfigError(
            f"every example has the label {classes.tolist()}: a probe needs at least two classes "
            "(give labelled examples of each class)"
        )
    if not alphas or any(not float(a) > 0 for a in alphas):
        raise ConfigError(f"alphas={list(alphas)}: the ridge penalties must be > 0 (selection.probe.alphas)")
    x = features.double()
    targets = torch.nn.functional.one_hot(index, classes.numel()).double() * 2 - 1
    # LabelBinarizer(neg_label=-1) as scikit-learn: one column for two classes
    y = targets[:, 1:] if classes.numel() == 2 else targets
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    keep = s > s.max() * max(xc.shape) * torch.finfo(s.dtype).eps  # the centred data's rank
    u, s, vh = u[:, keep], s[keep], vh[keep]
    uty = u.T @ yc
    best: tuple[float, float] | None = None  # (mean squared leave-one-out error, alpha)
    for alpha in alphas:
        shrink = s.square() / (s.square() + float(alpha))
        residual = yc - u @ (shrink[:, None] * uty)
        leverage = 1.0 / x.shape[0] + u.square() @ shrink  # the unpenalised intercept adds 1/n
        error = float((residual / (1 - leverage)[:, None]).square().mean())
        if best is None or error < best[0]:
            best = (error, float(alpha))
    assert best is not None
    alpha = best[1]
    coef = (vh.T @ ((s / (s.square() + alpha))[:, None] * uty)).T  # [columns, hidden]
    intercept = y_mean - coef @ x_mean
    return coef, intercept, alpha, tuple(int(c) for c in classes)


def _accuracy(coef: torch.Tensor, intercept: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> float:
    decision = x.double() @ coef.T + intercept
    predicted = (decision[:, 0] > 0).long() if decision.shape[1] == 1 else decision.argmax(1)
    return float((predicted == index).double().mean())


def fit_probes(
    states: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    *,
    alphas: Sequence[float] = AUTHORS_ALPHAS,
    test_examples: int = AUTHORS_TEST_EXAMPLES,
    split_seed: int = AUTHORS_SPLIT_SEED,
) -> list[LayerProbe]:
    """One ridge classifier per layer of `states` [layers, examples, hidden], fitted on the non-held-out examples."""
    labels = torch.as_tensor(labels).reshape(-1)
    if states.ndim != 3 or states.shape[1] != labels.numel():
        raise ConfigError(f"{labels.numel()} labels for hidden states of shape {list(states.shape)}")
    test = held_out(labels.numel(), test_examples, split_seed)
    probes = []
    for layer, layer_states in enumerate(states):
        coef, intercept, alpha, classes = fit_ridge_classifier(layer_states[~test], labels[~test], alphas)
        index = torch.searchsorted(torch.tensor(classes), labels)
        known = torch.isin(labels, torch.tensor(classes))
        train_acc = _accuracy(coef, intercept, layer_states[~test], index[~test])
        test_rows = test & known
        test_acc = (
            _accuracy(coef, intercept, layer_states[test_rows], index[test_rows]) if test_rows.any() else None
        )
        probes.append(LayerProbe(layer, coef.float(), intercept.float(), alpha, classes, train_acc, test_acc))
    return probes


def cosine_with_directions(
    model: nn.Module, directions: torch.Tensor, space: NeuronSpace
) -> dict[str, torch.Tensor]:
    """Group name → each vector's largest |cos| with any of `directions` [k, hidden] (get_top_neurons +
    make_neuron_dict). Only vectors of the residual stream (length = hidden size) can be compared."""
    unit = directions.double()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-30)
    scores = {}
    for group in space.groups:
        if group.length != unit.shape[1]:
            raise ConfigError(
                f"the probe compares vectors with the residual stream ({unit.shape[1]} wide), but group "
                f"{group.name} has vectors of {group.length}: use selection.modules among up, gate, down "
                "(or q, k, v, o)"
            )
        weight = model.get_parameter(group.weight).detach().double()
        vectors = weight if group.axis == 0 else weight.T  # [count, hidden]
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
        scores[group.name] = (vectors @ unit.to(vectors.device).T).abs().amax(dim=1).float().cpu()
    return scores


def probe_scores(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | torch.Tensor,
    space: NeuronSpace | None = None,
    *,
    pooling: str = "mean",
    directions: str = "class1",
    alphas: Sequence[float] = AUTHORS_ALPHAS,
    test_examples: int = AUTHORS_TEST_EXAMPLES,
    split_seed: int = AUTHORS_SPLIT_SEED,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Group name → each vector's largest |cos| with the probe directions of all layers (HIGH = selected first).

    `texts` and integer `labels` are a labelled classification task (the paper: XNLI, three classes);
    `space` defaults to the model's up/down vectors.
    """
    _check_choice(pooling, POOLINGS, "pooling")
    _check_choice(directions, DIRECTIONS, "directions")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != len(texts):
        raise ConfigError(f"{len(texts)} texts but {labels.numel()} labels: give one label per text")
    if torch.unique(labels).numel() < 2:
        raise ConfigError(
            f"every example has the label {torch.unique(labels).tolist()}: a probe needs at least two classes"
        )
    # refuse an impossible split before the forward passes
    held_out(labels.numel(), test_examples, split_seed)
    space = NeuronSpace.from_model(model) if space is None else space
    states = residual_states(
        model,
        tokenizer,
        texts,
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    probes = fit_probes(states, labels, alphas=alphas, test_examples=test_examples, split_seed=split_seed)
    for p in probes:
        logger.info(
            "probe layer %d: alpha %g, train accuracy %.3f, held-out accuracy %s",
            p.layer,
            p.alpha,
            p.train_accuracy,
            "–" if p.test_accuracy is None else f"{p.test_accuracy:.3f}",
        )
    return cosine_with_directions(model, torch.cat([p.directions(directions) for p in probes]), space)


def check_settings(setting: Any) -> None:
    """Refuse bad `selection.probe.*` values before any model loads; `setting(name)` returns a resolved value."""
    from pathlib import Path

    file = setting("file")
    if not file:
        raise ConfigError(
            "selection.probe.file is not set: the paper's probe needs the user's labelled classification data "
            '(the paper: XNLI), JSON lines {"text": ..., "label": <int>}; give selection.probe.file=<path>.jsonl '
            "(field names: selection.probe.text_field / label_field / template), or use selection=activation_probe "
            "(our MLP-activation probe, which can fall back on the task's own language pairs)"
        )
    if not Path(str(file)).expanduser().is_file():
        raise ConfigError(
            f'selection.probe.file={file}: no such file (JSON lines {{"text": ..., "label": <int>}}, e.g. XNLI)'
        )
    for name, allowed in (("pooling", POOLINGS), ("directions", DIRECTIONS)):
        if setting(name) not in allowed:
            raise ConfigError(f"selection.probe.{name}={setting(name)!r}: choose one of {list(allowed)}")
    for name, minimum in (("test_examples", 0), ("batch_size", 1), ("max_length", 1), ("split_seed", 0)):
        value = setting(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"selection.probe.{name}={value!r}: must be an integer >= {minimum}")
    limit = setting("max_examples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise ConfigError(f"selection.probe.max_examples={limit!r}: must be an integer >= 2, or null for all")
    alphas = setting("alphas")
    if alphas is not None and (
        isinstance(alphas, str)
        or not len(alphas)
        or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 for a in alphas)
    ):
        raise ConfigError(f"selection.probe.alphas={alphas!r}: must be a list of penalties > 0, or null")
