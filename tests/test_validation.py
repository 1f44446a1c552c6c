"""The whole config is checked before any work starts, and bad input of every kind (config values, neuron-set
files, exports, data files) ends with exit code 2 and one line naming the key or file and the fix."""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from neft_lab.config import compose
from neft_lab.data.sources import read_lines, read_local_split
from neft_lab.errors import ConfigError, DataError
from neft_lab.models.loading import load_pretrained, load_tokenizer
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.neurons.selection import select
from neft_lab.pipeline import run
from neft_lab.validation import validate


def _cfg(tmp_path: Path, *overrides: str):
    return compose([f"paths.run_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


# ---- the config, checked up front -----------------------------------------------------------------------
BAD = [
    (["optim.lr=abc"], "optim.lr='abc': must be a number > 0"),
    (["optim.lr=-1"], "optim.lr=-1: must be a number > 0"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["optim.betas=[0.9,1.0]"], "optim.betas[1]=1.0"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]: give two numbers"),
    (["optim.eps=0"], "optim.eps=0"),
    (
        ["optim.scheduler=wsd"],
        "optim.scheduler='wsd': unknown scheduler, choose one of ['constant', 'cosine', 'linear']",
    ),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1"),
    (["optim.master_dtype=bf16"], "optim.master_dtype='bf16'"),
    (["optim.clip_scope=all"], "optim.clip_scope='all'"),
    (["optim.loss_average=sum"], "optim.loss_average='sum': unknown, choose one of ('rank', 'global')"),
    (["loader.batch_size=0"], "loader.batch_size=0: must be an integer >= 1"),
    (["loader.eval_batch_size=0"], "loader.eval_batch_size=0"),
    (["loader.group_by_length=often"], "loader.group_by_length='often': give true or false"),
    (["eval.batch_size=0"], "eval.batch_size=0: must be an integer >= 1"),
    (["seed=-1"], "seed=-1: a seed must be an integer"),
    (["seed=1.5"], "seed=1.5"),
    (["trainer.max_steps=-1"], "trainer.max_steps=-1: must be an integer >= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    (["task.max_new_tokens=0"], "task.max_new_tokens=0: a token limit must be an integer >= 1"),
    (["task.max_prompt_tokens=-5"], "task.max_prompt_tokens=-5"),
    (["task.max_target_tokens=0"], "task.max_target_tokens=0"),
    (["stage=train"], "stage='train': unknown stage"),
    (["stage=eval"], "stage=eval needs ckpt="),
    (["stage=eval", "ckpt=/no/such/run"], "ckpt=/no/such/run does not exist"),
    (["stage=report"], "stage=report needs report.dir="),
    (["stage=report", "report.dir=/no/such/sweep"], "report.dir=/no/such/sweep does not exist"),
    (["model.dtype=int8"], "unknown model.dtype 'int8'"),
    (["model=hub"], "model=hub needs model.name_or_path"),
    # NeFT: the selection and its budget, before any reference fine-tune
    (["strategy=neft", "budget=1.5"], "budget=1.5 is above 1"),
    (["strategy=neft", "budget=0"], "budget=0.0: a budget must be > 0"),
    (["strategy=neft", "budget=-0.1"], "budget=-0.1: a budget must be > 0"),
    (["strategy=neft", "budget=abc"], "budget='abc': give a share of all parameters"),
    (
        ["strategy=neft", "selection.budget.kind=params"],
        "selection.budget.kind='params': unknown budget kind",
    ),
    (
        ["strategy=neft", "selection.budget.kind=vectors", "selection.budget.value=0"],
        "selection.budget.value=0.0",
    ),
    (
        ["strategy=neft", "selection.budget.kind=vectors", "selection.budget.value=2.5"],
        "must be a whole number",
    ),
    (
        ["strategy=neft", "selection.budget.kind=lora_rank", "selection.budget.value=-8"],
        "selection.budget.value=-8",
    ),
    (["strategy=neft", "selection.method=best"], "selection.method='best': unknown selection method"),
    (["strategy=neft", "selection.pooling=layer"], "selection.pooling='layer'"),
    (["strategy=neft", "selection.reference.steps=0"], "selection.reference.steps=0"),
    (["strategy=neft", "selection=none"], "strategy=neft needs a neuron selection"),
    (["strategy=neft", "selection=from_file"], "selection=from_file needs selection.file="),
    (
        ["strategy=neft", "selection=from_file", "selection.file=/no/set.safetensors"],
        "/no/set.safetensors does not exist",
    ),
    (
        ["strategy=neft", "selection=union", "selection.files=[/no/a,/no/b]"],
        "/no/a.safetensors does not exist",
    ),
    (
        ["strategy=neft", "trainer=fsdp", "strategy.impl=masked"],
        "strategy.impl=masked cannot train under trainer=fsdp",
    ),
    # LoRA
    (["strategy=lora", "strategy.r=match", "budget=1.5"], "budget=1.5 is above 1"),
    (["strategy=lora", "strategy.r=match", "budget=0"], "budget=0.0: a budget must be > 0"),
    (["strategy=lora", "strategy.r=match", "budget=paper_x"], "budget=paper_x"),
    (["strategy=lora", "strategy.r=0"], "strategy.r=0: give a positive integer LoRA rank"),
    (["strategy=lora", "strategy.r=abc"], "strategy.r='abc'"),
    # local data folders of a task that reads them
    (
        ["task=wmt_zh_en", "task.data.train_dir=/no/train", "task.data.test_dir=/tmp"],
        "/no/train does not exist",
    ),
    (["task=wmt_zh_en", "task.data.data_dir=/no/data"], "point task.data.data_dir at"),
    (["task=xsum", "task.data.data_dir=/tmp", "task.data.val_dir=/no/val"], "point task.data.val_dir at"),
    # issue 19 B11/B12: accepted though wrong, or a traceback once the model or the Trainer was built
    (["task.data.max_train=-5"], "task.data.max_train=-5: must be an integer >= 1 or null"),
    (["task.data.max_test=abc"], "task.data.max_test='abc': must be an integer >= 1 or null"),
    (["task.data.max_val=0"], "task.data.max_val=0"),
    (["task.prompt='Translate {source} {src}'"], "task.prompt has an unknown field {src}: use {source}"),
    (["task.prompt='{source} {'"], "task.prompt is not a valid template"),
    (["trainer.precision=foo"], "trainer.precision='foo': unknown precision, choose one of"),
    (["trainer.devices=0"], "trainer.devices=0: give a number of devices >= 1"),
    (["trainer.devices=abc"], "trainer.devices='abc'"),
    (["trainer.limit_val_batches=-1"], "trainer.limit_val_batches=-1"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc'"),
    (["trainer.accelerator=tpu2"], "trainer.accelerator='tpu2': choose one of"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    (["strategy=neft", "selection.seed=abc"], "selection.seed='abc': must be an integer >= 0"),
    (["model=tiny", "model.tiny.hidden_size=65"], "model.tiny.hidden_size=65 is not a multiple of"),
    (["model=tiny", "model.tiny.num_heads=0"], "model.tiny.num_heads=0: must be an integer >= 1"),
    (["model=tiny", "model.tiny.num_layers=abc"], "model.tiny.num_layers='abc'"),
    (["model=tiny", "model.tiny.arch=bert"], "model.tiny.arch='bert'"),
    # an unwritable cache: the reference run used to fail in it with a traceback
    (
        ["strategy=neft", "paths.cache_dir=/proc/neft_lab_cache"],
        "paths.cache_dir=/proc/neft_lab_cache is not writable",
    ),
    # A3: a budget above what the model can hold, from the model's shapes, before the reference run
    (["experiment=smoke", "strategy=neft", "budget=0.9"], "more than the 32,768 of all selectable vectors"),
    (
        [
            "experiment=smoke",
            "strategy=neft",
            "selection.budget.kind=vectors",
            "selection.budget.value=999999",
        ],
        "more than the",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides,fragment", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_refused_naming_key_and_fix(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tmp_path, *overrides))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)  # one line


VALID = [
    [],
    ["experiment=smoke"],
    ["experiment=quickstart"],
    ["experiment=paper_llama2"],
    ["experiment=paper_llama2_wmt_enzh"],
    ["experiment=paper_llama2_wmt_zhen"],
    ["experiment=paper_llama2_xsum"],
    ["debug=fast"],
    *[
        [f"strategy={s}"]
        for s in ("full", "lora", "neft", "random_neuron", "reverse_selection", "ft_embed", "ft_in_out")
    ],
    ["strategy=lora", "strategy.r=match"],
    ["strategy=lora", "strategy.r=match", "budget=paper_9"],
    ["strategy=neft", "budget=paper_12"],
    ["strategy=neft", "budget=1"],
    *[["strategy=neft", f"selection={s}"] for s in ("cosine", "reverse", "random", "cosine_plus_reverse")],
    ["strategy=neft", "selection.budget.kind=lora_rank", "selection.budget.value=8"],
    ["strategy=neft", "selection.budget.kind=vectors", "selection.budget.value=100"],
    ["strategy=neft", "trainer=fsdp", "strategy.impl=delta"],
    ["trainer=ddp"],
    ["trainer=gpu"],
    ["model=tiny", "task=xsum"],
    ["task=cnn_dm"],
    ["trainer.val_check_interval=0.5"],
    ["optim.master_dtype=null"],
]


@pytest.mark.parametrize("overrides", VALID, ids=[" ".join(o) or "defaults" for o in VALID])
def test_legitimate_configs_pass(tmp_path, monkeypatch, overrides):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # trainer=gpu is legitimate where CUDA is
    validate(_cfg(tmp_path, *overrides))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "overrides", [["trainer=gpu"], ["trainer.accelerator=gpu"], ["trainer.accelerator=cuda"]]
)
def test_gpu_trainer_without_cuda_is_refused_up_front(tmp_path, monkeypatch, overrides):
    """Issue 19 A3/B12: used to load the model, score zero-shot, then die in Hydra's InstantiationException."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"no CUDA GPU is visible .*trainer=cpu") as err:
        validate(_cfg(tmp_path, *overrides))
    assert "\n" not in str(err.value)


@pytest.mark.bad_input
def test_scoring_a_saved_run_on_a_gpu_without_cuda_is_refused_up_front(tmp_path, monkeypatch):
    """stage=eval generates on trainer.accelerator: without CUDA, one line before the model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    saved = tmp_path / "run"
    saved.mkdir()
    with pytest.raises(ConfigError, match=r"no CUDA GPU is visible .*trainer=cpu"):
        validate(_cfg(tmp_path, "stage=eval", f"ckpt={saved}", "trainer=gpu"))
    validate(_cfg(tmp_path, "stage=export", f"ckpt={saved}", "trainer=gpu"))  # export runs on the CPU


@pytest.mark.bad_input
def test_empty_hub_folder_is_refused_up_front(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty_model has no config.json: .*model.name_or_path"):
        validate(_cfg(tmp_path, "model=hub", f"model.name_or_path={empty}"))


@pytest.mark.bad_input
def test_budget_above_the_model_is_refused_before_the_reference(tiny_overrides, tmp_path):
    """Issue 19 A3: `experiment=smoke strategy=neft budget=0.9` ran 300 reference steps before saying so."""
    cfg = compose([*tiny_overrides, "strategy=neft", "budget=0.9"])
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="more than the"):
        run(cfg)
    assert time.perf_counter() - started < 2.0
    assert not (tmp_path / "cache" / "neft").exists()


@pytest.mark.bad_input
def test_refused_before_any_work(tiny_overrides, tmp_path):
    """A NeFT budget above 1 used to surface after the reference fine-tune; now it stops in well under a second,
    before the reference cache or the run folder exist."""
    for bad in (
        ["strategy=neft", "budget=1.5"],
        ["optim.lr=abc"],
        ["eval.batch_size=0"],
        ["task.max_new_tokens=0"],
    ):
        cfg = compose(tiny_overrides + bad)
        started = time.perf_counter()
        with pytest.raises(ConfigError):
            run(cfg)
        assert time.perf_counter() - started < 1.0, bad
        assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists(), bad


# ---- the CLI: exit code 2, one line, no traceback ------------------------------------------------------------
def _tiny_export(folder: Path) -> Path:
    model, tokenizer = build_tiny_model("llama")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _assert_one_line_error(done, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("neft_lab error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


CLI = [
    (["optim.lr=abc"], "optim.lr='abc'"),
    (["strategy=neft", "budget=1.5"], "budget=1.5 is above 1"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides,fragment", CLI, ids=[" ".join(o) for o, _ in CLI])
def test_cli_prints_one_line_and_exits_2(tmp_path, overrides, fragment):
    cache = tmp_path / "cache"
    done = run_cli(
        ["model=tiny", "logger=none", f"paths.cache_dir={cache}", *overrides], cwd=tmp_path, timeout=120
    )
    _assert_one_line_error(done, fragment)
    assert not (cache / "neft").exists()  # no reference fine-tune started


@pytest.mark.bad_input
def test_cli_truncated_export_is_one_line(tmp_path):
    export = _tiny_export(tmp_path / "export")
    _truncate(export / "model.safetensors")
    done = run_cli(["model=tiny", "logger=none", "stage=eval", f"ckpt={export}"], cwd=tmp_path, timeout=120)
    _assert_one_line_error(done, str(export), "truncated")


# ---- damaged files ------------------------------------------------------------------------------------------
def _saved_set(tmp_path: Path) -> Path:
    model, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(model)
    scores = {g.name: torch.rand(g.count, generator=torch.Generator().manual_seed(0)) for g in space.groups}
    return select(scores, space, 30 * 64, "cosine").save(tmp_path / "set")


@pytest.mark.bad_input
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.001])
def test_truncated_neuron_set_file(tmp_path, keep):
    file = _saved_set(tmp_path)
    _truncate(file, keep)
    with pytest.raises(
        ConfigError, match=r"neuron set .*set\.safetensors is truncated or damaged .*re-create it"
    ):
        NeuronSet.load(file)
    with pytest.raises(ConfigError, match="is truncated or damaged"):  # up front, before any model is loaded
        validate(_cfg(tmp_path, "strategy=neft", "selection=from_file", f"selection.file={file}"))


def _rewrite_header(file: Path, edit) -> None:
    """Rewrite the neft_lab metadata (JSON) inside a safetensors header, keeping the tensors intact."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["neft_lab"] = edit(header["__metadata__"]["neft_lab"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda text: text[: len(text) // 2], "damaged metadata (JSONDecodeError"),  # garbled JSON
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "groups"}), "KeyError"),
        (lambda text: json.dumps({**json.loads(text), "model_type": "t5"}), "does not know where the MLP"),
    ],
    ids=["garbled-json", "missing-key", "unknown-architecture"],
)
def test_garbled_neuron_set_metadata(tmp_path, edit, fragment):
    file = _saved_set(tmp_path)
    _rewrite_header(file, edit)
    with pytest.raises(ConfigError) as err:
        NeuronSet.load(file)
    assert str(file) in str(err.value) and fragment in str(err.value)


@pytest.mark.bad_input
def test_truncated_neuron_set_through_the_cli(tmp_path):
    file = _saved_set(tmp_path)
    _truncate(file)
    done = run_cli(
        ["model=tiny", "logger=none", "strategy=neft", "selection=from_file", f"selection.file={file}"],
        cwd=tmp_path,
        timeout=120,
    )
    _assert_one_line_error(done, str(file), "truncated or damaged")


@pytest.mark.bad_input
def test_truncated_or_garbled_export(tmp_path):
    export = _tiny_export(tmp_path / "export")
    weights = (export / "model.safetensors").read_bytes()
    for damaged in (weights[: len(weights) // 2], weights[:5], b"garbage" * 100):
        (export / "model.safetensors").write_bytes(damaged)
        with pytest.raises(
            ConfigError, match=rf"could not read the weights in '{re.escape(str(export))}'.*Re-create"
        ):
            load_pretrained(export, torch.float32)
    _truncate(export / "tokenizer.json")
    with pytest.raises(ConfigError, match=rf"could not load the tokenizer of '{re.escape(str(export))}'"):
        load_tokenizer(export)


# ---- neuron-set compatibility, complete ------------------------------------------------------------------
def _set_of(model) -> NeuronSet:
    space = NeuronSpace.from_model(model)
    return NeuronSet(space, {"up.0": torch.arange(5)}, meta={"model": {"name": "tiny"}})


@pytest.mark.bad_input
def test_neuron_set_of_a_model_with_more_layers_is_refused():
    neuron_set = _set_of(build_tiny_model("llama")[0])  # 2 layers; only layer 0 holds selected vectors
    deeper = NeuronSpace.from_model(build_tiny_model("llama", num_layers=3)[0])
    with pytest.raises(ConfigError, match="the set has 2 layers, the model 3"):
        neuron_set.check_same_space(deeper)


@pytest.mark.bad_input
def test_neuron_set_of_another_intermediate_size_names_group_and_shapes():
    neuron_set = _set_of(build_tiny_model("llama")[0])
    wider = NeuronSpace.from_model(build_tiny_model("llama", intermediate_size=96)[0])
    with pytest.raises(ConfigError) as err:
        neuron_set.check_same_space(wider)
    assert "up.0 is [vectors, length] [128, 64] in the set but [96, 64] in the model" in str(err.value)


@pytest.mark.bad_input
def test_model_groups_missing_from_the_set_are_found():
    """Every group of the model (of the set's kinds) must be in the set's space, not only the set's own groups."""
    model = build_tiny_model("llama")[0]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "layers.1.mlp.down_proj" not in n}
    partial = NeuronSpace.from_shapes("llama", shapes)
    neuron_set = NeuronSet(partial, {"up.0": torch.arange(5)})
    with pytest.raises(ConfigError, match=r"down\.1 \[128, 64\] is in the model but not in the set"):
        neuron_set.check_same_space(NeuronSpace.from_model(model))
    neuron_set.check_same_space(partial)  # its own space fits


# ---- data files whose lines are all blank ----------------------------------------------------------------
@pytest.mark.bad_input
def test_all_blank_file_is_refused_like_an_empty_one(tmp_path):
    blank = tmp_path / "test.en"
    blank.write_text("\n  \n\t\n\r\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.en is empty: its 4 line\(s\) are all blank"):
        read_lines(blank)
    (tmp_path / "test.zh").write_text("一\n二\n三\n四\n", encoding="utf-8")
    with pytest.raises(DataError, match="all blank"):  # references all blank: no BLEU to compute
        read_local_split(tmp_path, "test", "zh", "en", "zh", "en")
    (tmp_path / "train.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        read_local_split(tmp_path, "train", "zh", "en", "zh", "en")


@pytest.mark.bad_input
def test_lr_search_script_without_a_gpu_is_refused_in_one_line(tmp_path):
    """Issue 19 A3: scripts/lr_search.sh defaulted to trainer=gpu and printed the same Lightning traceback 48
    times on a machine without CUDA; now it stops before the first trial."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out"), "METHODS": "full"}
    env.pop("TRAINER", None)
    done = subprocess.run(
        ["bash", str(root / "scripts" / "lr_search.sh")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "TRAINER=cpu" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input
def test_a_cache_that_is_a_file_is_refused_up_front(tmp_path):
    cache = tmp_path / "cache_file"
    cache.write_text("")
    with pytest.raises(
        ConfigError, match=r"paths.cache_dir=.*cache_file is not writable .*a writable folder"
    ):
        validate(_cfg(tmp_path, "strategy=neft", f"paths.cache_dir={cache}"))


@pytest.mark.bad_input
def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    done = run_cli(["model=tiny", "logger=none", "hydra.run.dir=afile"], cwd=tmp_path, timeout=120)
    _assert_one_line_error(done, "hydra.run.dir=afile", "is a file, not a folder")


@pytest.mark.fault
def test_a_full_disk_ends_in_one_line_that_says_how_to_resume(tmp_path):
    """Issue 19 B11: a run that fails on a full or read-only disk said so in a traceback."""
    import subprocess
    import sys

    code = (
        "import errno, sys\n"
        "import neft_lab.pipeline as p\n"
        "def full(cfg):\n"
        "    try:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', 'run/checkpoints/last.ckpt')\n"
        "    except OSError as err:\n"
        "        raise RuntimeError('saving failed') from err\n"
        "p.run = full\n"
        "sys.argv = ['neft_lab', 'model=tiny', 'logger=none', 'hydra.run.dir=out']\n"
        "from neft_lab.__main__ import cli\n"
        "cli()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    _assert_one_line_error(done, "disk full or not writable", "rerun the same command to resume")
