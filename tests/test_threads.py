"""CPU threads: a count, auto (the idle cores), or torch's default with a warning when cores are busy."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from neft_lab import threads
from neft_lab.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_free_threads_fit_the_idle_cores():
    assert threads.free_threads(2, 1.0) == 1  # another job on one of two cores
    assert threads.free_threads(2, 0.1) == 2
    assert threads.free_threads(2, 2.0) == 1  # never 0
    assert threads.free_threads(16, 3.4) == 13


def test_busy_cores_are_measured_on_linux():
    busy = threads.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (threads.os.cpu_count() or 1)


def test_a_count_is_set(monkeypatch):
    assert threads.apply_threads(OmegaConf.create({"threads": 1})) == 1
    assert torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="threads='many'"):
        threads.apply_threads(OmegaConf.create({"threads": "many"}))


def test_auto_takes_the_idle_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.3: 1.1)
    assert threads.apply_threads(OmegaConf.create({"threads": "auto"})) == 1
    assert torch.get_num_threads() == 1


def test_default_keeps_torch_count_and_warns_when_cores_are_busy(monkeypatch, caplog):
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.3: 1.2)
    with caplog.at_level(logging.WARNING, logger="neft_lab.threads"):
        assert threads.apply_threads(OmegaConf.create({"threads": None})) == 2
    assert torch.get_num_threads() == 2  # unchanged: the same command gives the same bits on any load
    assert "pass threads=1" in caplog.text
    caplog.clear()
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.3: 0.1)
    with caplog.at_level(logging.WARNING, logger="neft_lab.threads"):
        threads.apply_threads(OmegaConf.create({"threads": None}))
    assert caplog.text == ""  # an idle machine: nothing to say


def test_validation_accepts_auto_and_refuses_zero():
    from neft_lab.config import compose
    from neft_lab.validation import validate

    validate(compose(["experiment=smoke", "threads=auto", "paths.run_dir=/tmp/x"]))
    with pytest.raises(ConfigError, match="threads"):
        validate(compose(["experiment=smoke", "threads=0", "paths.run_dir=/tmp/x"]))
