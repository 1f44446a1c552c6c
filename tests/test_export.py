"""NeFT exports the compact delta (with its base model's identity and hash) by default; `stage=eval` reads it
on a checked base, `stage=export` merges it into a Hugging Face folder, and a different base is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import read_metrics, run_cli
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.models.loading import load_model, load_pretrained, load_tokenizer
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons import sliced
from neft_lab.pipeline import run

COMMON = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"]
FIT = ["trainer.max_steps=10", "trainer.val_check_interval=5", "eval.before=false", "resume=false"]


@pytest.fixture(scope="module")
def neft_run(tmp_path_factory) -> Path:
    """A finished NeFT run (random selection: no reference run) with the default export settings."""
    root = tmp_path_factory.mktemp("neft")
    run_dir = root / "run"
    run(compose([*COMMON, *FIT, "strategy=random_neuron", f"paths.run_dir={run_dir}",
                 f"paths.cache_dir={root / 'cache'}"]))  # fmt: skip
    return run_dir


def _meta(delta: Path) -> dict[str, str]:
    with safe_open(str(delta), "pt") as f:
        return f.metadata()


def _base(*overrides: str) -> torch.nn.Module:
    return load_model(compose(["model=tiny", *overrides]).model)[0]


def _eval(tmp_path: Path, ckpt: Path, *extra: str) -> dict:
    out = tmp_path / f"eval{len(list(tmp_path.glob('eval*')))}"  # a folder per evaluation
    run(compose([*COMMON, "stage=eval", f"ckpt={ckpt}", f"paths.run_dir={out}", *extra]))
    return read_metrics(out)


def test_neft_exports_only_the_delta_with_its_base_identity_and_hash(neft_run):
    assert not (neft_run / "export").exists(), "the merged export is no longer written by default"
    delta_file = neft_run / "neft_delta.safetensors"
    meta, delta = _meta(delta_file), load_file(str(delta_file))
    assert meta["format"] == sliced.DELTA_FORMAT and meta["strategy"] == "random_neuron"
    assert (meta["base_name"], meta["base_source"], meta["base_dtype"]) == ("tiny_llama", "tiny", "float32")
    assert meta["hash_scheme"] == sliced.HASH_SCHEME
    modules = sliced.delta_modules(delta)
    assert len(modules) == 4  # up and down of 2 layers
    assert meta["base_hash"] == sliced.base_hash(_base(), modules)  # the untrained base's weights
    assert meta["base_hash"] != sliced.base_hash(_base("model.tiny.seed=1"), modules)
    # a bf16 load of a bf16-exact base hashes as its float32 load (the float32 bytes are digested)
    bf16 = _base().to(torch.bfloat16)
    assert sliced.base_hash(bf16, modules) == sliced.base_hash(bf16.to(torch.float32), modules)


def test_eval_of_a_run_folder_reads_the_delta_and_reproduces_the_run(neft_run, tmp_path):
    after = read_metrics(neft_run)["after"]
    for ckpt in (neft_run, neft_run / "neft_delta.safetensors"):
        again = _eval(tmp_path, ckpt)["after"]
        assert again["bleu"] == pytest.approx(after["bleu"], abs=1e-6), ckpt
        assert again["chrf"] == pytest.approx(after["chrf"], abs=1e-6), ckpt


def test_a_delta_on_another_base_is_refused_with_both_hashes(neft_run, tmp_path):
    alone = tmp_path / "alone" / "neft_delta.safetensors"  # no run config beside it: model= decides the base
    alone.parent.mkdir()
    shutil.copy(neft_run / "neft_delta.safetensors", alone)
    expected = _meta(alone)["base_hash"]
    found = sliced.base_hash(_base("model.tiny.seed=1"), sliced.delta_modules(load_file(str(alone))))
    with pytest.raises(ConfigError, match=rf"base hash is {expected[:16]}.* hashes {found[:16]}"):
        _eval(tmp_path, alone, "model=tiny", "model.tiny.seed=1")
    done = run_cli([*COMMON, "stage=eval", f"ckpt={alone}", "model.tiny.seed=1"], cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("neft_lab error:")]
    assert expected[:16] in line and found[:16] in line and "trained on another base model" in line
    assert _eval(tmp_path, alone, "model=tiny")["after"]["bleu"] == pytest.approx(
        read_metrics(neft_run)["after"]["bleu"], abs=1e-6
    )  # the right base (seed 0) is accepted


def test_stage_export_merges_base_and_delta_into_a_hugging_face_folder(neft_run, tmp_path):
    out = tmp_path / "merged"
    run(compose([*COMMON, "stage=export", f"ckpt={neft_run}", f"export.out={out}"]))
    assert not (neft_run / "export").exists()  # export.out decides where it goes
    base = _base()
    sliced.apply_delta(base, load_file(str(neft_run / "neft_delta.safetensors")))
    merged = load_pretrained(out, torch.float32)
    expected, got = base.state_dict(), merged.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert load_tokenizer(out) is not None
    run(compose([*COMMON, "stage=export", f"ckpt={neft_run}"]))  # default: <run>/export
    assert (neft_run / "export" / "config.json").exists()
    # a folder that is already a Hugging Face model: nothing to do
    model, tokenizer = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    run(compose([*COMMON, "stage=export", f"ckpt={tmp_path / 'hf'}"]))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before
    (neft_run / "export").rename(tmp_path / "moved_export")  # leave the shared run as the other tests expect
