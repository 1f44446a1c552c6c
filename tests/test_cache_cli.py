"""`python -m neft_lab.cache`: list the cache, drop reference weights (scores stay), whole old entries."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from filelock import FileLock

from neft_lab import cache


def _entry(root, name, weights=True, age_days=0.0):
    entry = root / "neft" / name
    (entry / "reference" / "export").mkdir(parents=True)
    (entry / "scores.safetensors").write_bytes(b"s" * 100)
    (entry / "scores.json").write_text("{}")
    if weights:
        (entry / "reference" / "export" / "model.safetensors").write_bytes(b"w" * 5000)
        (entry / "K000800" / "reference").mkdir(parents=True)
        (entry / "K000800" / "reference" / "last.ckpt").write_bytes(b"c" * 3000)
        (entry / "K000800" / "scores.safetensors").write_bytes(b"s" * 100)
    stamp = time.time() - age_days * 86400
    for path in [entry, *entry.rglob("*")]:
        os.utime(path, (stamp, stamp))
    return entry


def test_prune_weights_keeps_every_scores_file(tmp_path):
    entry = _entry(tmp_path, "gemma-wmt-K800-s0-abc")
    (tmp_path / "models" / "gemma-3-270m").mkdir(parents=True)
    freed, lines = cache.prune(tmp_path, weights=True, everything=False, older_than=None, dry_run=False)
    assert freed == 8000
    assert not (entry / "reference").exists() and not (entry / "K000800" / "reference").exists()
    assert (entry / "scores.safetensors").exists() and (entry / "K000800" / "scores.safetensors").exists()
    assert (tmp_path / "models" / "gemma-3-270m").exists()  # --weights never touches converted models
    assert len(lines) == 2


def test_dry_run_removes_nothing_and_old_entries_go_whole(tmp_path):
    old = _entry(tmp_path, "old-K4-s0-a", age_days=40)
    new = _entry(tmp_path, "new-K4-s0-b", age_days=1)
    freed, lines = cache.prune(tmp_path, weights=False, everything=True, older_than=30, dry_run=True)
    assert freed > 8000 and old.exists() and all("would remove" in line for line in lines)
    cache.prune(tmp_path, weights=False, everything=True, older_than=30, dry_run=False)
    assert not old.exists() and new.exists()


def test_an_entry_in_use_is_left_alone(tmp_path):
    entry = _entry(tmp_path, "busy-K4-s0-c")
    with FileLock(str(entry / ".lock")):
        # another process holds it (FileLock is re-entrant within one process: hold it from a child)
        child = subprocess.Popen(
            [sys.executable, "-c", f"from neft_lab import cache; from pathlib import Path; "
             f"print(cache.prune(Path({str(tmp_path)!r}), True, False, None, False))"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = child.communicate(timeout=120)
    assert "in use by another job" in out
    assert (entry / "reference" / "export" / "model.safetensors").exists()


def test_list_names_sizes_and_contents(tmp_path, capsys):
    _entry(tmp_path, "gemma-wmt-K800-s0-abc")
    assert cache.main(["list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gemma-wmt-K800-s0-abc" in out and "2 scores file(s)" in out and "reference weights 7.8 KB" in out
    assert cache.main(["list", "--dir", str(tmp_path / "none")]) == 0
