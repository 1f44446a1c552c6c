"""`python -m neft_lab.cache`: what the cache holds, and room made in it.

The cache (`paths.cache_dir`: $NEFT_LAB_CACHE, else ~/.cache/neft_lab) keeps, per NeFT reference config, the
reference run and the neuron scores computed from it (kilobytes to megabytes), and converted models (`models/`).
Once scored, a reference keeps only the weight matrices its scores were made from (`selection.reference.keep=
scored`, the default; `neurons/reference_weights.py`): Gemma-3-270M's up/down matrices, 189 MB, where the
exported model is 1.1 GB (Llama-2-7B in bf16: 5.8 GB of 13.5 GB); `keep=full` keeps the whole model (for
`stage=analyze` of the reference), a horizon's `snapshots/` keep resumable checkpoints for another K. Scores
are what a rerun needs; reference weights only serve a rescoring, the analysis and another K of the same run,
so they are what to drop first.

    python -m neft_lab.cache list                       # every entry: size, age, what it holds
    python -m neft_lab.cache prune --weights            # drop reference weights and checkpoints, keep scores
    python -m neft_lab.cache prune --all --older-than 30 # drop whole entries unused for 30 days
    python -m neft_lab.cache prune --weights --dry-run   # say what would go

An entry another job holds (its lock is taken: a reference in training or scoring) is left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from neft_lab.io import size_of
from neft_lab.neurons import reference_weights

SCORES = ("scores.safetensors", "scores.json")
WEIGHTS = ("reference", "snapshots")  # in an entry or its K<steps>/ subfolders: the reference run's folders


def default_root() -> Path:
    return Path(os.environ.get("NEFT_LAB_CACHE") or Path.home() / ".cache" / "neft_lab")


def last_used(path: Path) -> float:
    """The newest modification time under `path` (a rerun that reads its scores touches nothing: so this is
    when the entry was last written)."""
    times = [p.lstat().st_mtime for p in path.rglob("*") if p.is_file() and p.name != ".lock"]
    return max(times, default=path.lstat().st_mtime)  # files only: taking an entry's lock must not renew it


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


@dataclass
class Entry:
    path: Path
    kind: str  # neft (a reference and its scores) | model (a converted model)

    @property
    def weight_folders(self) -> list[Path]:
        if self.kind != "neft":
            return []
        homes = [self.path, *sorted(p for p in self.path.glob("K*") if p.is_dir())]
        return [home / name for home in homes for name in WEIGHTS if (home / name).exists()]

    @property
    def compact_kinds(self) -> list[str]:
        """The kinds of matrices the entry's compact references hold (empty: none is compact)."""
        kinds: list[str] = []
        for folder in self.weight_folders:
            held = (
                reference_weights.compact_metadata(folder / "export") if folder.name == "reference" else None
            )
            kinds += [k for k in (held or {}).get("kinds", []) if k not in kinds]
        return kinds

    @property
    def scores(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("scores.safetensors"))

    def describe(self, now: float) -> str:
        weights = sum(size_of(p) for p in self.weight_folders)
        days = (now - last_used(self.path)) / 86400
        holds = []
        if self.kind == "neft":
            holds.append(f"{len(self.scores)} scores file(s)")
            compact = f" (compact reference: {', '.join(self.compact_kinds)})" if self.compact_kinds else ""
            holds.append(
                f"reference weights {human(weights)}{compact}" if weights else "no reference weights"
            )
        else:
            holds.append("converted model")
        return f"{human(size_of(self.path)):>9}  {days:6.1f} d  {self.kind:5}  {self.path.name}  ({', '.join(holds)})"


def entries(root: Path) -> list[Entry]:
    found = [Entry(p, "neft") for p in sorted((root / "neft").glob("*")) if p.is_dir()]
    found += [Entry(p, "model") for p in sorted((root / "models").glob("*")) if p.is_dir()]
    return found


def _lock_of(entry: Entry) -> Path:
    return entry.path / ".lock" if entry.kind == "neft" else entry.path.with_name(entry.path.name + ".lock")


def prune(
    root: Path, weights: bool, everything: bool, older_than: float | None, dry_run: bool
) -> tuple[int, list[str]]:
    """Remove what the flags name; returns (bytes freed, one line per removal or skip)."""
    now, freed, lines = time.time(), 0, []
    for entry in entries(root):
        if older_than is not None and (now - last_used(entry.path)) / 86400 < older_than:
            continue
        targets = [entry.path] if everything else entry.weight_folders if weights else []
        if not targets:
            continue
        lock = FileLock(str(_lock_of(entry)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            lines.append(f"skipped {entry.path.name}: in use by another job")
            continue
        try:
            for target in targets:
                size = size_of(target)
                lines.append(f"{'would remove' if dry_run else 'removed'} {target} ({human(size)})")
                if not dry_run:
                    shutil.rmtree(target, ignore_errors=True)
                freed += size
        finally:
            lock.release()
    return freed, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neft_lab.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("list", "prune"))
    parser.add_argument(
        "--dir", type=Path, default=None, help="the cache (default: $NEFT_LAB_CACHE or ~/.cache/neft_lab)"
    )
    parser.add_argument(
        "--weights", action="store_true", help="prune: reference weights and checkpoints only"
    )
    parser.add_argument("--all", action="store_true", help="prune: whole entries (scores and models too)")
    parser.add_argument(
        "--older-than", type=float, default=None, metavar="DAYS", help="prune: only entries older"
    )
    parser.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    args = parser.parse_args(argv)
    root = args.dir or default_root()
    if not root.exists():
        print(f"no cache at {root} (nothing to do)")
        return 0
    if args.command == "list":
        found, now = entries(root), time.time()
        print(f"{root}: {human(size_of(root))} in {len(found)} entries (size, last written, kind, name)")
        for entry in found:
            print(entry.describe(now))
        return 0
    if not (args.weights or args.all):
        parser.error("prune needs --weights (reference weights only) or --all (whole entries)")
    freed, lines = prune(root, args.weights, args.all, args.older_than, args.dry_run)
    print("\n".join(lines) if lines else "nothing to prune")
    print(f"{'would free' if args.dry_run else 'freed'} {human(freed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
