"""Issue "First hour with neft_lab", items 3 (run folders) and 5 (noisy, thin output)."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.run_folder import command_dir

SMALL = ["trainer.max_steps=4", "trainer.val_check_interval=2", "eval.before=false", "logger=none"]


# --- item 3: run folders -------------------------------------------------------------------------


def test_failed_command_sets_its_folder_aside_and_names_its_log(tmp_path):
    proc = run_cli(["experiment=smoke", "logger=none", "model.dtype=bogus"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("unknown model.dtype 'bogus'") == 1, out  # each error once, on stderr
    assert "unknown model.dtype" in proc.stderr
    log = Path(out.split("(log: ", 1)[1].split(")", 1)[0])
    assert log.is_file() and "unknown model.dtype 'bogus'" in log.read_text()
    assert (tmp_path / "outputs" / "failed") in log.parents
    assert not (tmp_path / "outputs" / "runs").exists()  # nothing that looks like a result is left


def test_report_leaves_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(["stage=report", f"report.dir={tmp_path / 'empty'}"], cwd=tmp_path, timeout=300)
    assert not (tmp_path / "outputs" / "reports").exists(), proc.stdout + proc.stderr
    assert not (tmp_path / "outputs" / "failed").exists()


def test_resume_folder_logs_there_and_leaves_no_stray_folder(tmp_path, tiny_overrides):
    folder = tmp_path / "earlier"
    folder.mkdir()
    saved = compose([*tiny_overrides, *SMALL, f"paths.run_dir={folder}"])
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(saved, resolve=True))
    proc = run_cli([f"resume={folder}"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # no checkpoint there to resume from
    assert f"(log: {folder.resolve()}/" in proc.stderr
    assert any("no checkpoint" in p.read_text() for p in folder.glob("*.log"))
    assert folder.is_dir() and not (tmp_path / "outputs" / "failed").exists()  # the resumed folder stays
    assert not list((tmp_path / "outputs").rglob(".hydra"))  # no stray Hydra folder for this command


def test_folders_are_named_after_what_ran():
    assert command_dir("fit", "embedded_en_fr", "lora", None, "T") == "runs/embedded_en_fr/lora/T"
    run = "outputs/runs/embedded_en_fr/lora/2026-01-01_00-00-00"
    assert (
        command_dir("eval", "embedded_en_fr", "full", run, "T")
        == "evals/T-embedded_en_fr-lora-2026-01-01_00-00-00"
    )
    assert command_dir("eval", "x", "full", f"{run}/checkpoints/last.ckpt", "T").endswith("-checkpoints-last")
    assert command_dir("eval", "x", "full", "/data/my-model/export", "T") == "evals/T-my-model-export"
    assert command_dir("report", "x", "full", None, "T") == "reports/T"
    hydra = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "hydra" / "default.yaml")
    assert "neft_lab.command_dir:${stage}" in OmegaConf.to_container(hydra)["run"]["dir"]


# --- item 5: output ------------------------------------------------------------------------------


def test_unreachable_hub_fails_at_once(monkeypatch):
    from neft_lab.models.loading import load_model

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    model = {"source": "hub", "name_or_path": "neft-lab-tests/no-such-model-7f3a", "dtype": "float32"}
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable.*local folder"):
        load_model(model)
    assert time.perf_counter() - started < 3
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        load_model(model)


def test_evaluation_bar_counts_sentences(monkeypatch, tiny_overrides):
    from neft_lab.data.datamodule import TaskDataModule
    from neft_lab.data.encoding import PromptEncoder
    from neft_lab.data.task import Task
    from neft_lab.evaluation import generate
    from neft_lab.models.loading import load_model

    bars = []

    class Bar:
        def __init__(self, **kwargs):
            self.kwargs, self.updates = kwargs, []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(generate, "tqdm", Bar)
    cfg = compose(tiny_overrides)
    model, tokenizer = load_model(cfg.model)
    task = Task.from_config(cfg.task)
    encoder = PromptEncoder(tokenizer, task, chat_template=cfg.model.chat_template)
    examples = TaskDataModule(task, encoder, seed=0).examples("test")[:5]
    generate.generate_predictions(model, encoder, examples, batch_size=2, max_new_tokens=2)
    assert bars[0].kwargs["total"] == 5 and bars[0].kwargs["unit"] == "sent"
    assert bars[0].updates == [2, 2, 1]


def test_neft_reference_run_shows_steps_and_one_run_dir(tiny_overrides, tmp_path, capfd, caplog):
    from neft_lab.pipeline import run

    overrides = [o for o in tiny_overrides if o != "trainer.enable_progress_bar=false"]
    with caplog.at_level(logging.INFO):
        run(compose([*overrides, *SMALL, "strategy=neft", "selection.reference.steps=3"]))
    shown = "".join(capfd.readouterr())  # Lightning's bars go to stdout
    assert "reference step: 100%" in shown and "3/3" in shown, shown[-2000:]
    assert "Epoch 0/-2" not in shown
    lines = [r.getMessage() for r in caplog.records]
    assert sum("\nrun dir:" in m for m in lines) == 1
    assert sum("\nreference run dir:" in m for m in lines) == 1


def test_smoke_run_prints_no_deprecation_warnings(tmp_path):
    proc = run_cli(["experiment=smoke", "strategy=lora", *SMALL], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("DeprecationWarning", "FutureWarning", "is deprecated"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert sum("run dir:" in line for line in proc.stdout.splitlines()) == 1


# --- item 7: smoke results show each method learning -----------------------------------------------


@pytest.mark.parametrize("strategy", ["full", "lora", "neft", "random_neuron"])
def test_each_smoke_method_shows_its_test_loss_falling(strategy, tiny_overrides, tmp_path, caplog):
    """On the tiny random model NeFT cannot translate yet (BLEU 0 reads as a failure); the test-set loss of
    the references, before and after, shows what every method learned, and the outcome lines say it."""
    from neft_lab.pipeline import run

    caplog.set_level(logging.INFO, logger="neft_lab")
    run(compose([*tiny_overrides, f"strategy={strategy}"]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, after = metrics["before"]["loss"], metrics["after"]["loss"]
    assert after < 0.7 * before, (
        strategy,
        before,
        after,
    )  # measured: full -98%, LoRA -49%, NeFT -40%, random -41%
    outcomes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("results in")]
    outcome = outcomes[-1]  # NeFT: after its reference run's
    assert f"test loss {before:.2f} → {after:.2f}" in outcome, outcome


# --- item 4: checkpoints keep the best and the last, never two copies of one step ------------------


def test_best_and_last_of_the_same_step_share_one_file(tiny_overrides, tmp_path):
    import torch

    from neft_lab.pipeline import run

    run(
        compose([*tiny_overrides, *SMALL])
    )  # 4 steps, validation every 2: the loss falls, best = last = step 4
    folder = tmp_path / "run" / "checkpoints"
    files = sorted(folder.glob("*.ckpt"))
    assert {f.name for f in files} == {"last.ckpt", "step000004-val" + files[1].name.split("-val")[1]}, files
    last, best = folder / "last.ckpt", next(f for f in files if f.name != "last.ckpt")
    assert last.stat().st_ino == best.stat().st_ino  # one file on disk, two names
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    # resume still finds a complete state there (post-validation: it records the new best itself)
    recorded = [v.get("best_model_path") for v in state["callbacks"].values() if isinstance(v, dict)]
    assert str(best) in recorded


def test_evaluation_device_is_the_cpu_without_a_gpu_or_under_fsdp(monkeypatch):
    import torch

    from neft_lab.stages.fit import evaluation_device

    assert evaluation_device(compose(["trainer=cpu"])).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert evaluation_device(compose(["trainer=gpu"])) == torch.device("cuda", 1)
    assert evaluation_device(compose(["trainer=fsdp"])).type == "cpu"  # the Trainer shards it there
