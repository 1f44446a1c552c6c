"""Real 2-process jobs (gloo, CPU) through the command line: DDP and FSDP2 for every kind of strategy.

Most jobs use Lightning's own launcher (`trainer.devices=2`: rank 0 starts rank 1 when it reaches
`fit`); the FSDP NeFT job uses torchrun, whose ranks start together and race for NeFT's reference
run. The five jobs run two at a time (each is mostly Python processes importing); each test waits
for the job it checks.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed
from safetensors.torch import load_file

from conftest import REPO, read_metrics, run_cli
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.models.loading import load_pretrained
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.neuron_set import NeuronSet
from neft_lab.ranks import launched_as_rank_zero
from neft_lab.strategies import StrategyContext, build_strategy
from neft_lab.training.distributed import check_replicas_agree, uses_fsdp2

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available in this torch build"
)

TWO_CPU_PROCESSES = [
    "experiment=smoke",
    "logger=csv",
    "trainer.log_every_n_steps=1",  # the loss curve, step by step
    "optim.loss_average=global",  # the mean over both ranks' tokens: the gradient of one process with both batches
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "task.data.max_train=64",
    "task.data.max_val=16",
    "task.data.max_test=4",
    "eval.before=false",
]
# the merged export/ is compared below
NEFT = ["strategy=neft", "selection.reference.steps=4", "strategy.export_merged=true"]
JOBS = {
    "ddp_full": ["trainer=ddp", "strategy=full"],
    "ddp_lora": ["trainer=ddp", "strategy=lora"],
    "ddp_neft": ["trainer=ddp", *NEFT],  # impl=fused, the default
    "fsdp_full": ["trainer=fsdp", "strategy=full"],
    "fsdp_neft": ["torchrun", "trainer=fsdp", *NEFT, "strategy.impl=delta"],
    "fsdp_neft_fused": ["trainer=fsdp", *NEFT],  # the vectors written into the weight shards after each step
    "fsdp_lora": ["trainer=fsdp", "strategy=lora"],
    # one process with both ranks' batch (the sampler deals one permutation out to the ranks: the same examples
    # per step); NeFT's reference keeps the 2-process runs' batch of 16, so it selects the same neurons
    "one_full": ["trainer.devices=1", "loader.batch_size=32", "strategy=full"],
    "one_lora": ["trainer.devices=1", "loader.batch_size=32", "strategy=lora"],
    "one_neft": ["trainer.devices=1", "loader.batch_size=32", *NEFT, "selection.reference.batch_size=16"],
}


def _torchrun(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m neft_lab ARGS` with one run folder for both ranks."""
    env = {**os.environ, "WANDB_MODE": "offline", "NEFT_LAB_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "neft_lab", *args, f"hydra.run.dir={cwd / 'outputs' / 'run'}"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


class Job:
    def __init__(self, future: Future, cwd: Path) -> None:
        self.future, self.cwd = future, cwd

    def result(self) -> tuple[str, Path]:
        done = self.future.result()
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        (metrics,) = (self.cwd / "outputs").rglob("metrics.json")  # one run folder, one metrics.json
        return output, metrics.parent


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Job]:
    pool = ThreadPoolExecutor(max_workers=2)
    started = {}
    for name, args in JOBS.items():
        cwd = tmp_path_factory.mktemp(name)
        launch, args = (_torchrun, args[1:]) if args[0] == "torchrun" else (run_cli, args)
        args = [*TWO_CPU_PROCESSES, *args, f"paths.cache_dir={cwd / 'cache'}"]
        started[name] = Job(pool.submit(launch, args, cwd, 300), cwd)
    yield started
    pool.shutdown(wait=True)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(run_dir / "export", torch.float32).state_dict()


def _train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def _check_once(output: str, run_dir: Path) -> None:
    """Rank 1 stopped after fit; rank 0 alone exported, evaluated and wrote the results."""
    assert "rank 1: training done" in output
    assert output.count(f"results in {run_dir}/metrics.json") == 1
    assert output.count("after fine-tuning: loss=") == 1
    assert (run_dir / "predictions.jsonl").exists() and (run_dir / "export").is_dir()
    assert read_metrics(run_dir)["train"]["steps"] == 6


@pytest.mark.parametrize(
    "name", ["ddp_full", "ddp_lora", "ddp_neft", "fsdp_full", "fsdp_neft", "fsdp_neft_fused", "fsdp_lora"]
)
def test_two_process_job_trains_and_writes_results_once(jobs, name):
    output, run_dir = jobs[name].result()
    _check_once(output, run_dir)
    if name.startswith("ddp"):
        assert "replicas agree after training" in output  # the weights are identical on both ranks
    else:
        assert "FSDP2: 2 decoder layers + root sharded over 2 processes" in output


def test_ddp_lora_synchronises_only_the_adapters(jobs):
    output, run_dir = jobs["ddp_lora"].result()
    metrics = read_metrics(run_dir)
    adapters, values = 2 * 7 * 2, metrics["trainable_parameters"]  # layers × linear modules × (A, B)
    assert f"DDP synchronises {adapters} parameter tensors, {values} values" in output
    assert (run_dir / "export" / "adapter_config.json").exists()


def test_ddp_neft_synchronises_only_slices_and_changes_only_them(jobs):
    output, run_dir = jobs["ddp_neft"].result()
    metrics = read_metrics(run_dir)
    assert metrics["impl"] == "fused"
    # DDP registered the slice parameters alone: selected vectors × their length (64)
    assert metrics["neuron_parameters"] == metrics["neuron_vectors"] * 64
    assert f"parameter tensors, {metrics['neuron_parameters']} values" in output
    assert "replicas agree after training: " in output
    # rank 0 ran the reference on one process before starting rank 1, which read the cached scores
    assert output.count("reference run: full fine-tuning") == 1 and "neuron scores from cache" in output
    # the exported model (rank 0's weights, which agree with rank 1's) moved only selected vectors
    neuron_set = NeuronSet.load(run_dir / "neuron_set.safetensors")
    base = build_tiny_model("llama")[0].state_dict()
    masks, moved_vectors = neuron_set.masks(), 0
    for name, tensor in _weights(run_dir).items():
        group = next((g for g in neuron_set.space.groups if g.weight == name), None)
        if group is None:
            assert torch.equal(tensor, base[name]), f"{name} is not selected but changed"
            continue
        moved = (tensor != base[name]).any(dim=1 - group.axis)
        assert not (moved & ~masks[group.name]).any(), f"unselected vectors of {name} changed"
        moved_vectors += int(moved.sum())
    assert moved_vectors > 0.9 * neuron_set.num_vectors


def test_torchrun_ranks_share_one_reference_run(jobs):
    """Both ranks start together and call the scoring; the cache lock lets one run the reference."""
    output, _ = jobs["fsdp_neft"].result()
    assert output.count("reference run: full fine-tuning") == 1
    assert output.count("neuron scores from cache") == 1  # the other rank, after waiting for the lock


def test_fsdp_full_trains_the_same_model_as_ddp(jobs):
    ddp, fsdp = _weights(jobs["ddp_full"].result()[1]), _weights(jobs["fsdp_full"].result()[1])
    base = build_tiny_model("llama")[0].state_dict()
    assert all(not torch.equal(tensor, base[name]) for name, tensor in fsdp.items() if "proj" in name)
    for name, tensor in fsdp.items():
        torch.testing.assert_close(tensor, ddp[name], atol=1e-4, rtol=1e-4, msg=f"{name}: FSDP ≠ DDP")


def test_fsdp_neft_delta_matches_ddp_neft_fused(jobs):
    """Same neurons, same data: FSDP2 with the delta layer ends where DDP with the fused layer does."""
    ddp_dir, fsdp_dir = jobs["ddp_neft"].result()[1], jobs["fsdp_neft"].result()[1]
    metrics = read_metrics(fsdp_dir)
    assert metrics["impl"] == "delta" and metrics["trainable_parameters"] == metrics["neuron_parameters"]
    fsdp_set = NeuronSet.load(fsdp_dir / "neuron_set.safetensors")  # separate caches, same reference
    assert fsdp_set.overlap(NeuronSet.load(ddp_dir / "neuron_set.safetensors")) == 1.0
    ddp, fsdp = _weights(ddp_dir), _weights(fsdp_dir)
    for name, tensor in fsdp.items():
        torch.testing.assert_close(tensor, ddp[name], atol=1e-4, rtol=1e-4, msg=f"{name}: FSDP ≠ DDP")
    delta = load_file(str(fsdp_dir / "neft_delta.safetensors"))
    assert sum(v.numel() for k, v in delta.items() if k.endswith(".vectors")) == metrics["neuron_parameters"]


def test_fsdp_neft_fused_matches_ddp_neft_fused_and_leaves_the_rest_bit_identical(jobs):
    """Issue 21: fused NeFT under FSDP2 (2 gloo processes) ends where DDP does; every weight entry outside the
    selected vectors is the base's, bit for bit, after the writes into the shards."""
    ddp_dir, fsdp_dir = jobs["ddp_neft"].result()[1], jobs["fsdp_neft_fused"].result()[1]
    metrics = read_metrics(fsdp_dir)
    assert metrics["impl"] == "fused" and metrics["trainable_parameters"] == metrics["neuron_parameters"]
    neuron_set = NeuronSet.load(fsdp_dir / "neuron_set.safetensors")
    assert neuron_set.overlap(NeuronSet.load(ddp_dir / "neuron_set.safetensors")) == 1.0
    ddp, fsdp = _weights(ddp_dir), _weights(fsdp_dir)
    for name, tensor in fsdp.items():
        torch.testing.assert_close(tensor, ddp[name], atol=1e-4, rtol=1e-4, msg=f"{name}: FSDP ≠ DDP")
    base = build_tiny_model("llama")[0].state_dict()
    delta = load_file(str(fsdp_dir / "neft_delta.safetensors"))
    changed = 0
    for key in [k for k in delta if k.endswith(".indices")]:
        module, axis = key.removesuffix(".indices"), int(delta[key.replace(".indices", ".axis")])
        weight, before = fsdp[f"{module}.weight"], base[f"{module}.weight"]
        keep = torch.ones(weight.shape[axis], dtype=torch.bool)
        keep[delta[key]] = False
        assert torch.equal(
            weight.index_select(axis, keep.nonzero()[:, 0]), before.index_select(axis, keep.nonzero()[:, 0])
        )
        changed += int(
            not torch.equal(weight.index_select(axis, delta[key]), before.index_select(axis, delta[key]))
        )
    assert changed > 0  # the selected vectors trained


def test_fsdp_lora_trains_the_same_adapters_as_ddp(jobs):
    """The comparison holds under FSDP2 too: LoRA's adapters end where DDP's do."""
    ddp_dir, fsdp_dir = jobs["ddp_lora"].result()[1], jobs["fsdp_lora"].result()[1]
    ddp = load_file(str(ddp_dir / "export" / "adapter_model.safetensors"))
    fsdp = load_file(str(fsdp_dir / "export" / "adapter_model.safetensors"))
    assert fsdp.keys() == ddp.keys() and any("lora_B" in k and v.abs().sum() > 0 for k, v in fsdp.items())
    for name, tensor in fsdp.items():
        torch.testing.assert_close(tensor, ddp[name], atol=1e-4, rtol=1e-4, msg=f"{name}: FSDP ≠ DDP")


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    """What a run trained: LoRA's adapters, else the exported model's weights."""
    adapter = run_dir / "export" / "adapter_model.safetensors"
    return load_file(str(adapter)) if adapter.exists() else _weights(run_dir)


@pytest.mark.parametrize(
    "many", ["ddp_full", "fsdp_full", "ddp_lora", "fsdp_lora", "ddp_neft", "fsdp_neft", "fsdp_neft_fused"]
)
def test_two_processes_train_what_one_process_trains_on_both_batches(jobs, many):
    """Issue 21: with optim.loss_average=global, 2 processes (DDP or FSDP2; NeFT fused or delta) follow the loss
    curve of one process that takes both ranks' batches at once, and end with its weights."""
    one_dir, many_dir = jobs["one_" + many.split("_")[1]].result()[1], jobs[many].result()[1]
    curve, single = _train_losses(many_dir), _train_losses(one_dir)
    assert len(curve) == len(single) == 6 and single[-1] < single[0]
    assert curve == pytest.approx(single, rel=1e-4, abs=1e-5)
    if "neft" in many:
        assert (
            NeuronSet.load(many_dir / "neuron_set.safetensors").overlap(
                NeuronSet.load(one_dir / "neuron_set.safetensors")
            )
            == 1.0
        )
    one, two = _trained(one_dir), _trained(many_dir)
    assert two.keys() == one.keys()
    for name, tensor in two.items():
        torch.testing.assert_close(
            tensor, one[name], atol=1e-4, rtol=1e-4, msg=f"{name}: {many} ≠ one process"
        )


@pytest.mark.parametrize("name", ["fsdp_neft_fused", "fsdp_full", "fsdp_lora"])
def test_fsdp_run_resumes_after_a_crash_where_the_uninterrupted_run_ends(jobs, tmp_path, monkeypatch, name):
    """Killed at step 4 (its last checkpoint: step 3), the same command resumes under FSDP2 (Lightning's sharded
    checkpoint) and ends with the uninterrupted run's weights: NeFT fused, full fine-tuning and LoRA alike."""
    args = [*TWO_CPU_PROCESSES, *JOBS[name], f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    crash = ["+callbacks.crash._target_=conftest.CrashAtStep", "+callbacks.crash.step=4"]
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    )
    crashed = run_cli([*args, *crash], tmp_path, 300)
    assert crashed.returncode != 0 and "simulated crash at step 4" in crashed.stdout + crashed.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    resumed = run_cli(args, tmp_path, 300)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert "resuming from" in output and read_metrics(tmp_path / "run")["train"]["steps"] == 6
    whole = _trained(jobs[name].result()[1])
    assert _train_losses(tmp_path / "run")[-2:] == pytest.approx(
        _train_losses(jobs[name].result()[1])[-2:], rel=1e-6
    )
    for key, tensor in _trained(tmp_path / "run").items():
        torch.testing.assert_close(tensor, whole[key], atol=1e-6, rtol=1e-6, msg=f"{key}: resumed ≠ whole")


def test_fsdp_refuses_the_masked_layer_before_starting(tmp_path):
    cfg = compose(["experiment=smoke", "trainer=fsdp", "strategy=neft", "strategy.impl=masked"])
    assert uses_fsdp2(cfg.trainer) and not uses_fsdp2(compose(["trainer=ddp"]).trainer)
    with pytest.raises(ConfigError, match="Use strategy.impl=fused or delta with trainer=fsdp"):
        build_strategy(cfg.strategy).prepare(StrategyContext(cfg=cfg, cache_dir=tmp_path))


def test_rank_zero_from_the_launchers_environment(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert launched_as_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # Lightning's launcher on the second node
    assert not launched_as_rank_zero()
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert not launched_as_rank_zero()


def test_replica_check_names_the_tensors_that_differ(monkeypatch):
    """`check_replicas_agree` against a fake second rank whose up_proj slice moved."""
    model, _ = build_tiny_model("llama")

    def gather(out, local):
        other = [(n, s, g, v + 1.0 if "up_proj" in n and v is not None else v) for n, s, g, v in local]
        out[:] = [local, other]

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    assert check_replicas_agree(model, "after training", "none") == len(list(model.parameters()))
    with pytest.raises(RuntimeError, match=r"disagree after training on 2 tensors.*layers.0.mlp.up_proj"):
        check_replicas_agree(model, "after training", "all")
