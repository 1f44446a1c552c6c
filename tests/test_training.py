"""In-process runs of the pipeline on the tiny model: training lowers the loss, results land on disk."""

from __future__ import annotations

import json

import pytest

from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.pipeline import run


def test_smoke_run_learns_and_writes_results(tiny_overrides, tmp_path):
    cfg = compose(tiny_overrides + ["trainer.max_steps=150", "trainer.val_check_interval=50"])
    run(cfg)
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 150
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    # the embedded task is learnable: loss falls well below its start (ln 512 ≈ 6.2 for a random model)
    assert metrics["train"]["best_val_loss"] < 3.0
    assert metrics["after"]["chrf"] > metrics["before"]["chrf"] + 10
    assert {"bleu", "chrf", "n"} <= set(metrics["after"])
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["after"]["n"] == 32
    assert set(predictions[0]) == {
        "source",
        "reference",
        "prediction",
        "loss_sum",
        "loss_tokens",
    }  # per-segment loss
    assert (run_dir / "export" / "config.json").exists() and (run_dir / "config.yaml").exists()
    assert list((run_dir / "checkpoints").glob("*.ckpt"))


def test_lora_checkpoint_holds_only_adapters(tiny_overrides, tmp_path):
    import torch

    cfg = compose(
        tiny_overrides
        + ["strategy=lora", "trainer.max_steps=4", "trainer.val_check_interval=2", "eval.before=false"]
    )
    run(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert (tmp_path / "run" / "export" / "adapter_config.json").exists()


def test_unknown_stage_is_a_config_error(tiny_overrides):
    with pytest.raises(ConfigError, match="stage='train': unknown stage"):
        run(compose(tiny_overrides + ["stage=train"]))
