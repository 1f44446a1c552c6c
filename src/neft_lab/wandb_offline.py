"""Read an offline W&B run back without the server: config, history, summary, tags and logged tables.

An offline run folder (`<run>/wandb/offline-run-<time>-<id>/`) holds `run-<id>.wandb`, a record log
in the LevelDB log format (a 7-byte file header `:W&B` + magic 0xBEE1 + version 0, then 32 KiB
blocks of chunks `crc32 (IEEE, over type byte + payload) | length uint16 | type uint8 | payload`,
types FULL/FIRST/MIDDLE/LAST), each record a `wandb.proto.wandb_internal_pb2.Record`. wandb >= 0.30
reads these files only inside its Go core (`wandb-core`); this module is the small Python reader
the SDK no longer ships. Media (tables, histograms as JSON, images) live under the folder's `files/`.

    from neft_lab.wandb_offline import find_offline_runs, read_offline_run
    run = read_offline_run(find_offline_runs("outputs/multiruns/2026-01-01_00-00-00")[0])
    run.config["optim"]["lr"], run.summary["test/bleu"], run.table("test/predictions")["data"][:3]
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
BLOCK = 32768
CHUNK_HEADER = 7  # crc32 uint32 | length uint16 | type uint8
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    """The file is not a W&B record log, or a chunk is damaged."""


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """Every complete record payload of a `.wandb` log, in order; a torn tail (live run) ends the scan."""
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise WandbLogError(f"{path} is not a W&B record log (header {data[:7]!r})")
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # the block's tail is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero-filled (preallocated) space: nothing more was written
            break
        start = pos + CHUNK_HEADER
        payload = data[start : start + length]
        if len(payload) < length:
            break
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise WandbLogError(f"{path}: damaged chunk at byte {pos} (checksum mismatch)")
        pos = start + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        else:
            raise WandbLogError(f"{path}: unknown chunk type {kind} at byte {pos}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """The records of a `.wandb` log as `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    artifacts: list[dict[str, str]] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def values(self, key: str) -> list[Any]:
        """Every logged value of a history key, in step order."""
        return [row[key] for row in self.history if key in row]

    def table(self, key: str) -> dict[str, Any]:
        """A logged `wandb.Table` ({"columns": [...], "data": [[...], ...]}), read from the run's files."""
        ref = next((v for v in reversed(self.values(key)) if isinstance(v, dict)), None)
        ref = ref or self.summary.get(key)
        if not isinstance(ref, dict) or "path" not in ref:
            raise KeyError(f"no table logged under '{key}' in {self.folder}")
        return json.loads((self.folder / "files" / ref["path"]).read_text())


def read_offline_run(folder: str | Path, wait: float = 10.0) -> OfflineRun:
    """Decode an offline run folder (or its `run-<id>.wandb` file).

    `wandb.finish()` returns before W&B's service has written the run's last records (measured: 3 of 12 runs read
    right after finish() had no record yet), so a run without its exit record is read again until it has one, or
    no record has been added for 2 s (a killed run never gets one), for at most `wait` seconds."""
    folder = Path(folder)
    log = folder if folder.suffix == ".wandb" else next(iter(sorted(folder.glob("run-*.wandb"))), None)
    if log is None:
        raise FileNotFoundError(f"no run-*.wandb record log in {folder}")
    deadline = time.monotonic() + wait
    seen, quiet_since = -1, time.monotonic()
    while True:
        run, records = _decode(log)
        now = time.monotonic()
        if records != seen:
            seen, quiet_since = records, now
        if run.exit_code is not None or now - quiet_since >= 2.0 or now >= deadline:
            return run
        time.sleep(0.2)


def _decode(log: Path) -> tuple[OfflineRun, int]:
    """The run as its log holds it now, and how many records that is."""
    run = OfflineRun(folder=log.parent)
    records = 0
    if log.stat().st_size < len(HEADER):  # created, its header not written yet
        return run, records
    for record in iter_records(log):
        records += 1
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group = r.run_id, r.project, r.run_group
            run.name, run.tags = r.display_name, list(r.tags)
            _apply_items(run.config, r.config.update)
        elif kind == "config":
            _apply_items(run.config, record.config.update)
            for item in record.config.remove:
                _remove(run.config, _path(item))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _path(item), _history_value(item))
            run.history.append(row)
        elif kind == "summary":
            _apply_items(run.summary, record.summary.update)
            for item in record.summary.remove:
                _remove(run.summary, _path(item))
        elif kind == "files":
            run.files.extend(f.path for f in record.files.files)
        elif kind == "artifact":
            run.artifacts.append({"name": record.artifact.name, "type": record.artifact.type})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run, records


def find_offline_runs(root: str | Path) -> list[Path]:
    """Every W&B run folder (offline or synced) under `root`, by path."""
    return sorted(p.parent for p in Path(root).rglob("run-*.wandb"))


def _path(item: Any) -> list[str]:
    """`key`, or `nested_key` for a value inside a dict (W&B splits logged dicts and media into leaves)."""
    return [item.key] if item.key else list(item.nested_key)


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[path[-1]] = value


def _remove(target: dict[str, Any], path: list[str]) -> None:
    for part in path[:-1]:
        target = target.get(part) if isinstance(target.get(part), dict) else {}
    target.pop(path[-1], None)


def _apply_items(target: dict[str, Any], items: Any) -> None:
    for item in items:
        _set(target, _path(item), json.loads(item.value_json) if item.value_json else None)


def _history_value(item: Any) -> Any:
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)
