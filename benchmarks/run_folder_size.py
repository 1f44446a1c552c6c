"""What a run folder weighs on disk, per strategy and by part: checkpoints, export, NeFT delta, the rest.

    python benchmarks/run_folder_size.py --model gemma3_270m --steps 4   # the real Gemma-3-270M, CPU (minutes)
    python benchmarks/run_folder_size.py --model tiny --steps 4

Each row is a real `python -m neft_lab` run (in process, logger=none, eval.after=false) of `--steps` steps
with one validation at the end (so the best and the last checkpoint are of the same step), in a scratch
folder: full fine-tuning, LoRA (its default rank), NeFT with the default export (the delta only) and NeFT
with `strategy.export_merged=true` (the delta and the merged Hugging Face folder). NeFT here is
`strategy=random_neuron` at the default 9% budget: the same run folder as `strategy=neft`, whose
reference run lives in the cache, not in the run folder. A file hard-linked twice counts once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from neft_lab.config import compose
from neft_lab.io import atomic_write_json
from neft_lab.pipeline import run

RUNS = {
    "full": ["strategy=full"],
    "lora": ["strategy=lora"],
    "neft": ["strategy=random_neuron"],
    "neft (export_merged=true)": ["strategy=random_neuron", "strategy.export_merged=true"],
}
PARTS = ("checkpoints", "export", "delta", "other")


def _part(relative: Path) -> str:
    top = relative.parts[0]
    if top in ("checkpoints", "export"):
        return top
    return "delta" if top == "neft_delta.safetensors" else "other"


def folder_size(folder: Path) -> dict[str, int]:
    """Bytes per part of a run folder; each inode counted once (hard links), symlinks not followed."""
    sizes, seen = dict.fromkeys(PARTS, 0), set()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        sizes[_part(path.relative_to(folder))] += stat.st_size
    sizes["total"] = sum(sizes[p] for p in PARTS)
    return sizes


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(
        f"{p.name} ({os.stat(p).st_size:,} B, links {os.stat(p).st_nlink})"
        for p in (folder / "checkpoints").glob("*.ckpt")
    )


def _size(n: int, unit: float) -> str:
    return f"{n / unit:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    results: dict = {
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for label in args.runs:
            run_dir = Path(scratch) / "".join(c if c.isalnum() else "_" for c in label)
            cfg = compose(
                [
                    f"model={args.model}",
                    "task=embedded",
                    "logger=none",
                    "resume=false",
                    f"trainer.max_steps={args.steps}",
                    f"trainer.val_check_interval={args.steps}",
                    "trainer.enable_progress_bar=false",
                    f"loader.batch_size={args.batch}",
                    "task.data.embedded.n_val=8",
                    "eval.before=false",
                    "eval.after=false",
                    f"paths.run_dir={run_dir}",
                    *RUNS[label],
                ]
            )
            started = time.perf_counter()
            run(cfg)
            sizes = folder_size(run_dir)
            metrics_file = run_dir / "metrics.json"
            trainable = None
            if metrics_file.exists():
                trainable = json.loads(metrics_file.read_text()).get("trainable_parameters")
            results["runs"][label] = {
                "overrides": RUNS[label],
                "seconds": round(time.perf_counter() - started, 1),
                "trainable_parameters": trainable,
                "bytes": sizes,
                "checkpoint_files": checkpoint_files(run_dir),
            }
            print(f"{label}: {sizes['total']:,} B, checkpoints {checkpoint_files(run_dir)}")
    out = Path(args.out or Path(__file__).parent / "results" / f"run_folder_size-{args.model}.json")
    atomic_write_json(out, results)
    small = max(entry["bytes"]["total"] for entry in results["runs"].values()) < 1e7
    unit, unit_name = (1e3, "kB (10^3 bytes)") if small else (1e6, "MB (10^6 bytes)")
    print(f"\n{args.model}, {args.steps} steps: {unit_name} per part of the run folder")
    print(f"{'run':28} {'trainable':>12} " + " ".join(f"{p:>12}" for p in (*PARTS, "total")))
    for label, entry in results["runs"].items():
        sizes = entry["bytes"]
        trainable = f"{entry['trainable_parameters']:,}" if entry["trainable_parameters"] else "?"
        cells = " ".join(f"{_size(sizes[p], unit):>12}" for p in (*PARTS, "total"))
        print(f"{label:28} {trainable:>12} {cells}")
    print(f"→ {out}")


if __name__ == "__main__":
    main()
