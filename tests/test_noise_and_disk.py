"""Issue 19, A.11: progress bars on stderr (stdout keeps the results), no accelerator inventory on a CPU run,
and a NeFT reference cache that keeps only the weight matrices its scores were made from."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from neft_lab import cache, chain
from neft_lab.analysis.runs import read_run
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.scoring import WeightSource
from neft_lab.pipeline import run
from neft_lab.training.trainer import StepProgressBar, build_trainer, route_lightning_logs_through_hydra
from neft_lab.validation import validate

BAR_MARKS = ("it/s]", "%|")  # a tqdm bar's rate, its bar (run_cli reads text: a redraw's \r reads as \n)


# ---- 1. progress bars on stderr, 2. no "TPU available" --------------------------------------------------
@pytest.fixture(scope="module")
def smoke_neft(tmp_path_factory):
    """`python -m neft_lab experiment=smoke strategy=neft` in small, with every progress bar on."""
    root = tmp_path_factory.mktemp("noise")
    done = run_cli(
        ["experiment=smoke", "strategy=neft", "logger=none", "trainer.enable_progress_bar=true",
         "trainer.max_steps=6", "trainer.val_check_interval=3", "selection.reference.steps=3",
         "task.data.embedded.n_test=4", f"paths.cache_dir={root / 'cache'}"],
        cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_progress_bars_go_to_stderr_and_stdout_keeps_the_results(smoke_neft):
    out, err = smoke_neft.stdout, smoke_neft.stderr
    assert not [mark for mark in BAR_MARKS if mark in out], out[-2000:]
    # every bar of the run, on stderr: the reference run's, the scorer's, Lightning's over the fit and its
    # validation, the evaluation's
    for bar in ("reference step", "scoring neurons", "Epoch 0", "Validation", "test (after fine-tuning)"):
        assert bar in err, bar
    assert all(mark in err for mark in BAR_MARKS)
    assert " after: " in out and "test loss" in out  # the results stay on stdout


def test_every_lightning_bar_writes_to_stderr(tiny_overrides, tmp_path):
    """Whatever the callbacks: Lightning's own default bar (callbacks=none) and the configured one."""
    for callbacks in ("default", "none"):
        cfg = compose([*tiny_overrides, f"callbacks={callbacks}", "trainer.enable_progress_bar=true"])
        bar = build_trainer(cfg, tmp_path / callbacks).progress_bar_callback
        assert bar is not None and bar.init_train_tqdm().fp._wrapped is sys.stderr, callbacks
    reference_bar = StepProgressBar("reference step")
    assert reference_bar.init_train_tqdm().fp._wrapped is sys.stderr


def test_a_cpu_run_prints_no_accelerator_inventory(smoke_neft):
    text = smoke_neft.stdout + smoke_neft.stderr
    assert "TPU available" not in text and "HPU available" not in text
    if not torch.cuda.is_available():
        assert "GPU available" not in text  # no GPU to speak of


def test_the_device_line_stays_where_a_gpu_is_there():
    route_lightning_logs_through_hydra()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def shown(message: str) -> bool:
        return bool(
            rank_zero.filter(
                rank_zero.makeRecord(rank_zero.name, logging.INFO, __file__, 0, message, (), None)
            )
        )

    assert not shown("TPU available: False, using: 0 TPU cores")
    assert not shown("HPU available: False, using: 0 HPUs")
    assert not shown("GPU available: False, used: False")
    assert shown("GPU available: True (cuda), used: True")  # which device a GPU run uses
    assert shown("GPU available: True (cuda), used: False")  # a GPU left unused is worth a line
    assert shown("`Trainer.fit` stopped: `max_steps=3` reached.")  # other Lightning info stays


# ---- 3. the reference cache keeps only what scoring reads ------------------------------------------------
SHORT = ["selection=cosine", "trainer.max_steps=4", "trainer.val_check_interval=2", "eval.before=false",
         "eval.after=false"]  # fmt: skip
COMPACT, INFO = "reference_weights.safetensors", "reference_weights.json"


def _entry(tmp_path: Path) -> Path:
    (entry,) = (tmp_path / "cache" / "neft").iterdir()
    return entry


def _weights(export: Path) -> dict[str, torch.Tensor]:
    return {n: t for f in sorted(export.glob("*.safetensors")) for n, t in load_file(f).items()}


def test_the_reference_cache_keeps_only_the_scored_matrices(tiny_overrides, tmp_path):
    base = [*tiny_overrides, *SHORT]
    run(compose([*base, "stage=reference"]))
    entry = _entry(tmp_path)
    export = entry / "reference" / "export"
    full = _weights(export)
    (entry / "reference" / "checkpoints").mkdir(exist_ok=True)  # as an interrupted reference run leaves them
    (entry / "reference" / "checkpoints" / "last.ckpt").write_bytes(b"c" * 1000)
    before = cache.size_of(entry)

    run(compose([*base, "stage=score"]))
    after = cache.size_of(entry)
    space = NeuronSpace.from_shapes("llama", {n: t.shape for n, t in full.items()}, ["up", "down"])
    kept = load_file(export / COMPACT)
    assert sorted(kept) == sorted(g.weight for g in space.groups)  # the up and down matrices, nothing else
    assert all(torch.equal(kept[n], full[n]) and kept[n].dtype == full[n].dtype for n in kept)
    assert sorted(p.name for p in export.iterdir()) == [INFO, COMPACT]  # no config, tokenizer, embeddings
    info = json.loads((export / INFO).read_text())
    assert info["kinds"] == ["up", "down"] and info["model_type"] == "llama" and info["tensors"] == len(kept)
    assert not (entry / "reference" / "checkpoints").exists()
    assert (entry / "scores.safetensors").exists()
    print(
        f"tiny smoke reference entry: {before:,} -> {after:,} bytes"
    )  # 457,818 -> 143,850 when written (a 1 KB checkpoint included)
    assert after < 0.4 * before

    source = WeightSource(export)  # the scorer's reader takes the compact form
    assert source.model_type == "llama" and set(source.shapes()) == set(kept)
    with pytest.raises(ConfigError, match="has no weight"):
        source.get("model.embed_tokens.weight")
    listing = _listing(tmp_path / "cache")
    assert "compact reference: up, down" in listing


def _listing(root: Path) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cache.main(["list", "--dir", str(root)]) == 0
    return out.getvalue()


def test_a_compact_reference_scores_again_and_one_that_lacks_a_matrix_runs_again(
    tiny_overrides, tmp_path, caplog
):
    base = [*tiny_overrides, *SHORT]
    run(compose([*base, "stage=score"]))
    entry = _entry(tmp_path)
    scores = entry / "scores.safetensors"
    first = load_file(scores)

    scores.unlink()  # scored again from the compact weights, without a reference run
    with caplog.at_level(logging.INFO, logger="neft_lab"):
        run(compose([*base, "stage=score"]))
    assert "reference run:" not in caplog.text and "reference model from cache" in caplog.text
    again = load_file(scores)
    assert all(torch.equal(first[k], again[k]) for k in first)

    # a compact file without the down matrices (an older or damaged entry): the reference runs again, said why
    compact = entry / "reference" / "export" / COMPACT
    kept = {n: t for n, t in load_file(compact).items() if "down_proj" not in n}
    save_file(kept, str(compact), metadata={"format": "neft_lab.compact_reference/1", "model_type": "llama",
                                            "kinds": json.dumps(["up"])})  # fmt: skip
    scores.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neft_lab"):
        run(compose([*base, "stage=score"]))
    assert "lacks the down matrices" in caplog.text and "reference run:" in caplog.text
    assert all(torch.equal(first[k], v) for k, v in load_file(scores).items())
    assert any("down_proj" in n for n in load_file(compact))  # compacted again, now with every scored matrix


def test_keep_full_keeps_the_model_for_the_analysis_and_none_keeps_nothing(tiny_overrides, tmp_path, caplog):
    base = [*tiny_overrides, *SHORT]
    run(compose([*base, "stage=score"]))
    reference = _entry(tmp_path) / "reference"
    with pytest.raises(
        ConfigError, match="selection.reference.keep=full"
    ):  # the analysis: one line, no traceback
        read_run(reference)
    with pytest.raises(ConfigError, match="selection.reference.keep=full"):  # stage=eval of it, the same
        run(compose([*base, "stage=eval", f"ckpt={reference}", f"paths.run_dir={tmp_path / 'eval'}"]))

    # the whole model asked for (its scores are cached): the compact entry cannot serve it, the reference runs again
    with caplog.at_level(logging.INFO, logger="neft_lab"):
        run(compose([*base, "stage=score", "selection.reference.keep=full"]))
    assert "selection.reference.keep=full asks for the whole model" in caplog.text
    assert "reference run:" in caplog.text
    assert (reference / "export" / "config.json").exists() and (
        reference / "export" / "model.safetensors"
    ).exists()
    assert read_run(reference).folder == reference
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neft_lab"):  # and stays: served from the cache, not run again
        assert chain.reference(compose([*base, "stage=reference"])) == reference / "export"
    assert "reference run:" not in caplog.text

    run(compose([*base, "stage=score", "selection.reference.keep=none", "selection.reference.steps=3"]))
    assert not list((tmp_path / "cache" / "neft").glob("*K3*/reference"))  # only the scores stay
    assert list((tmp_path / "cache" / "neft").glob("*K3*/scores.safetensors"))


@pytest.mark.bad_input
def test_an_unknown_keep_is_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="selection.reference.keep"):
        validate(compose([*tiny_overrides, *SHORT, "strategy=neft", "selection.reference.keep=some"]))
    for value in ("true", "false", "scored", "full", "none"):
        validate(compose([*tiny_overrides, *SHORT, "strategy=neft", f"selection.reference.keep={value}"]))
