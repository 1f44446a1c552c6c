"""A run killed mid-training resumes from its last checkpoint and ends with the same weights."""

from __future__ import annotations

import pytest
import torch

from conftest import read_metrics
from neft_lab.config import compose
from neft_lab.models.loading import load_pretrained
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.pipeline import run

STEPS = [
    "trainer.max_steps=24",
    "trainer.val_check_interval=5",
    "eval.after=false",
    "eval.before=false",
    "task.data.embedded.n_train=96",
    "optim.scheduler=cosine",
    "optim.weight_decay=0.1",
]


def _weights(run_dir):
    return load_pretrained(run_dir / "export", torch.float32).state_dict()


@pytest.mark.fault
@pytest.mark.parametrize("strategy", ["full", "neft"])
def test_killed_run_resumes_to_identical_weights(tmp_path, strategy):
    base = [
        "experiment=smoke",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "selection.reference.steps=10",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"strategy={strategy}",
        *STEPS,
    ]
    if strategy == "full":
        base.remove("selection.reference.steps=10")
    else:  # the merged export/ is compared below (the delta is compared too)
        base.append("strategy.export_merged=true")
    run(compose(base + [f"paths.run_dir={tmp_path / 'whole'}"]))
    interrupted = tmp_path / "interrupted"
    crash = ["+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=13"]
    with pytest.raises(RuntimeError, match="simulated crash at step 13"):
        run(compose(base + crash + [f"paths.run_dir={interrupted}"]))
    assert (interrupted / "checkpoints" / "last.ckpt").exists() and not (interrupted / "export").exists()
    last = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=False)
    assert (
        last["global_step"] == 10
    )  # the last checkpoint before the crash: 2 epochs of 6 batches are not done
    before = last["callbacks"]["RunStats"]  # the interrupted attempt's time, up to its last checkpoint
    assert before["wall_seconds"] > before["train_seconds"] > 0 and len(before["step_seconds"]) == 10
    run(compose(base + [f"paths.run_dir={interrupted}"]))  # resume=auto finds last.ckpt
    resumed_metrics, whole_metrics = read_metrics(interrupted), read_metrics(tmp_path / "whole")
    assert resumed_metrics["wall_seconds"] > before["wall_seconds"]  # both attempts count, not only the last
    assert resumed_metrics["train"]["seconds"] > before["train_seconds"]
    assert resumed_metrics["train"]["steps"] == whole_metrics["train"]["steps"]
    whole, resumed = _weights(tmp_path / "whole"), _weights(interrupted)
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming"
    if strategy == "neft":
        a = NeuronSet.load(tmp_path / "whole" / "neuron_set.safetensors")
        b = NeuronSet.load(interrupted / "neuron_set.safetensors")
        assert a.overlap(b) == 1.0 and a.num_vectors == b.num_vectors
        from safetensors.torch import load_file

        da = load_file(str(tmp_path / "whole" / "neft_delta.safetensors"))
        db = load_file(str(interrupted / "neft_delta.safetensors"))
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_resume_of_a_folder_without_checkpoint_is_an_error(tmp_path, tiny_overrides):
    from neft_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="not a run folder"):
        run(compose(tiny_overrides + [f"resume={tmp_path}"]))


@pytest.mark.fault
def test_killed_ddp_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    """The same with 2 gloo processes: each rank restarts at its own place in the epoch."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from conftest import REPO, run_cli

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))  # the subprocesses import conftest.CrashAtStep
    common = [
        "experiment=smoke",
        "logger=none",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        *STEPS,
    ]
    assert run_cli([*common, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path).returncode == 0
    crashed = run_cli(
        [
            *common,
            f"hydra.run.dir={tmp_path / 'int'}",
            "+callbacks.crash._target_=conftest.CrashAtStep",
            "+callbacks.crash.step=13",
        ],
        cwd=tmp_path,
    )
    assert crashed.returncode != 0 and "simulated crash at step 13" in crashed.stderr
    resumed = run_cli([*common, f"hydra.run.dir={tmp_path / 'int'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    whole = load_file(str(tmp_path / "whole" / "export" / "model.safetensors"))
    again = load_file(str(tmp_path / "int" / "export" / "model.safetensors"))
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_settings_of_other_stages_do_not_block_a_resume():
    """A run started before `analysis.*` or `report.*` defaults changed (a neft_lab upgrade, or another
    stage's override on the command line) resumes: fit reads neither. A training setting still blocks it."""
    from neft_lab.run_folder import config_differences

    saved = {
        "optim": {"lr": 1e-5},
        "analysis": {"aggregation": "max", "threshold": 0.142},
        "report": {"alpha": 0.05},
    }
    new = {
        "optim": {"lr": 1e-5},
        "analysis": {"aggregation": "max_abs", "threshold": 0.28},
        "report": {"alpha": 0.01},
    }
    assert config_differences(saved, new) == []
    assert config_differences(saved, {**new, "optim": {"lr": 3e-5}}) == ["optim.lr: 1e-05 → 3e-05"]


def test_a_moved_model_cache_does_not_block_a_resume():
    """NEFT_LAB_CACHE (paths.cache_dir, and model.cache_dir below it) says where downloads and conversions are
    kept, not what trains: a run resumes after the cache moved. The model itself still blocks it."""
    from neft_lab.run_folder import config_differences

    saved = {"model": {"name": "gemma3_270m", "cache_dir": "/root/.cache/neft_lab"}}
    new = {"model": {"name": "gemma3_270m", "cache_dir": "/data/cache/neft_lab"}}
    assert config_differences(saved, new) == []
    assert config_differences(saved, {"model": {**new["model"], "name": "tiny"}}) == [
        "model.name: 'gemma3_270m' → 'tiny'"
    ]
