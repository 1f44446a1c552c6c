"""Atomic file and folder writes: a crash or Ctrl-C never leaves a half-written artifact behind (and `size_of`,
the bytes a file or folder holds)."""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it over `path`.

    The temporary file lives in the target's own folder, so the rename is atomic on that filesystem
    (a copy from $TMPDIR across filesystems is not): a kill or a full disk leaves the old `path` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary sibling, fsync it and rename it over `path`."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def _umask() -> int:
    """The process umask, read without changing it (Linux: `Umask:` in /proc/self/status); elsewhere
    read once by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


@functools.cache
def _umask_by_setting() -> int:
    # os.umask can only be read by setting it: for that instant a strict 077, never a permissive 0,
    # so a file another thread creates meanwhile is at worst private, not world-writable
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> Path:
    """Give `path` (and, for a folder, everything under it) the mode a plain create under the current
    umask gives: 0666 & ~umask for files (0777 & ~umask if the owner may execute them), 0777 & ~umask
    for folders. For files that were created private (mkstemp, mkdtemp, safetensors' `save_file`)."""
    path = Path(path)
    mask = _umask()
    file_mode, exec_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask, 0o777 & ~mask

    def one(item: Path) -> None:
        if item.is_symlink():
            return
        if item.is_dir():
            os.chmod(item, dir_mode)
        else:
            os.chmod(item, exec_mode if item.stat().st_mode & 0o100 else file_mode)

    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                one(Path(root) / name)
    one(path)
    return path


def strict_json(data: Any) -> Any:
    """`data` with every NaN or infinite float (Python, NumPy) replaced by None: JSON has no NaN."""
    if isinstance(data, dict):
        return {_json_key(k): strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    if isinstance(data, numbers.Real) and not isinstance(data, numbers.Integral):
        value = float(data)
        return value if math.isfinite(value) else None
    return data


def _json_key(key: Any) -> Any:
    return str(key) if isinstance(key, float) and not math.isfinite(key) else key


def _dumps(data: Any, **kwargs: Any) -> str:
    """Strict JSON (`allow_nan=False`): non-finite floats become null, other non-JSON values their str."""
    return json.dumps(strict_json(data), ensure_ascii=False, allow_nan=False, default=str, **kwargs)


def atomic_savefig(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG, written like every other artifact (atomic, the umask's mode)."""
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, _dumps(data, indent=2) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(_dumps(r) + "\n" for r in rows))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp makes 0700, safetensors 0600: results are meant to be shared
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def size_of(path: Path) -> int:
    """The bytes `path` holds: a file's (a link's own, not its target's) or the sum over the files under a
    folder, links not followed."""
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
