"""Corpus metrics: sacreBLEU BLEU and chrF, ROUGE-1/2/L (Google's rouge-score), optional COMET."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

CJK_LANGS = {"zh", "ja", "ko"}


def bleu_tokenizer(target_lang: str) -> str:
    """sacreBLEU's tokenizer for the target language: `zh` for Chinese, `ja-mecab`-free defaults otherwise."""
    return "zh" if target_lang == "zh" else "13a"


def bleu_with_signature(
    predictions: list[str], references: list[str], target_lang: str = "en", lowercase: bool = False
) -> tuple[float, str]:
    """sacreBLEU corpus BLEU and its signature (`nrefs:1|case:lc|eff:no|tok:zh|...`), which says which BLEU it is.

    `lowercase=True` is `sacrebleu --lowercase`, the paper authors' setting; the signature is
    only known once the metric has scored (it counts the references).
    """
    metric = bleu_metric(target_lang, lowercase)
    result = metric.corpus_score(predictions, [references])
    return float(result.score), str(metric.get_signature())


def bleu_metric(target_lang: str = "en", lowercase: bool = False) -> Any:
    """The sacreBLEU BLEU object every BLEU here is computed with (reports and significance tests too)."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=bleu_tokenizer(target_lang), lowercase=lowercase)


def chrf_metric() -> Any:
    """sacreBLEU's chrF with its defaults (`sacrebleu.corpus_chrf`)."""
    from sacrebleu.metrics import CHRF

    return CHRF()


def bleu(
    predictions: list[str], references: list[str], target_lang: str = "en", lowercase: bool = False
) -> float:
    return bleu_with_signature(predictions, references, target_lang, lowercase)[0]


def chrf(predictions: list[str], references: list[str]) -> float:
    return float(chrf_metric().corpus_score(predictions, [references]).score)


class _CharTokenizer:
    """ROUGE over characters for CJK targets, where whitespace tokenization sees one word per sentence."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def rouge(predictions: list[str], references: list[str], target_lang: str = "en") -> dict[str, float]:
    """Mean F1 of ROUGE-1/2/L (x100), stemmed for English, per character for CJK."""
    segments = rouge_segments(predictions, references, target_lang)
    n = max(len(predictions), 1)
    return {kind: sum(values) / n for kind, values in segments.items()}


ROUGE_KINDS = ("rouge1", "rouge2", "rougeL")


def rouge_segments(
    predictions: list[str], references: list[str], target_lang: str = "en"
) -> dict[str, list[float]]:
    """Each segment's ROUGE-1/2/L F1 (x100): what `rouge` averages and a paired bootstrap resamples."""
    from rouge_score import rouge_scorer

    kinds = list(ROUGE_KINDS)
    if target_lang in CJK_LANGS:
        scorer = rouge_scorer.RougeScorer(kinds, tokenizer=_CharTokenizer())
    else:
        scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    out: dict[str, list[float]] = {kind: [] for kind in kinds}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for kind in kinds:
            out[kind].append(100.0 * scores[kind].fmeasure)
    return out


def comet_gpus(device: Any, cuda_available: bool | None = None) -> int:
    """How many GPUs COMET scores on: 1 when the evaluated model is on a CUDA device (and CUDA is there), else 0
    (the CPU): COMET follows the device the run trained and generated on."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return 1 if cuda_available and torch.device(device).type == "cuda" else 0


def comet(
    sources: list[str],
    predictions: list[str],
    references: list[str],
    model_name: str,
    batch_size: int = 16,
    gpus: int = 0,
) -> float | None:
    """COMET system score x100, or None (with a logged reason) when the package or model is missing; on `gpus`
    GPUs (0: the CPU; `comet_gpus` picks the run's device)."""
    try:
        from comet import download_model, load_from_checkpoint
    except ImportError:
        logger.warning("COMET skipped: install the extra with `pip install 'neft_lab[comet]'`")
        return None
    try:
        model = load_from_checkpoint(download_model(model_name))
    except Exception as err:  # offline, gated or missing checkpoint
        logger.warning(
            "COMET skipped: could not load %s (%s). Set eval.comet_model to a local checkpoint.",
            model_name,
            err,
        )
        return None
    data = [{"src": s, "mt": p, "ref": r} for s, p, r in zip(sources, predictions, references)]
    output = model.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=False)
    return 100.0 * float(output.system_score)


def score(
    metrics: tuple[str, ...] | list[str],
    sources: list[str],
    predictions: list[str],
    references: list[str],
    target_lang: str,
    comet_model: str = "Unbabel/wmt22-comet-da",
    bleu_lowercase: bool = False,
    comet_gpus: int = 0,
) -> dict[str, Any]:
    """Every metric the task names, as a flat dict; BLEU comes with its sacreBLEU signature (`bleu_signature`).
    COMET runs on `comet_gpus` GPUs (0: the CPU)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    results: dict[str, Any] = {"n": len(predictions)}
    for name in metrics:
        if name == "bleu":
            results["bleu"], results["bleu_signature"] = bleu_with_signature(
                predictions, references, target_lang, bleu_lowercase
            )
        elif name == "chrf":
            results["chrf"] = chrf(predictions, references)
        elif name == "rouge":
            results.update(rouge(predictions, references, target_lang))
        elif name == "comet":
            results["comet"] = comet(sources, predictions, references, comet_model, gpus=comet_gpus)
        else:
            raise ValueError(f"unknown metric '{name}'")
    return results
