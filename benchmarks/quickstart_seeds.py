"""What a user sees from `python -m neft_lab experiment=quickstart`: the README's command over several seeds.

    python benchmarks/quickstart_seeds.py                 # seeds 0 1 2, the real Gemma-3-270M on CPU (~3 min each)
    python benchmarks/quickstart_seeds.py --seeds 0 --extra model=tiny trainer.max_steps=20   # a dry run

Each seed is the README's command in a fresh process (`seed=<s>`, its own run folder); the table gives
BLEU/chrF before and after, the best checkpoint's step and the wall time, and the JSON records the
versions of the packages that change the numbers (torch, transformers, peft, lightning, sacrebleu).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from neft_lab.io import atomic_write_json

PACKAGES = ("torch", "transformers", "peft", "lightning", "sacrebleu", "tokenizers", "gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides (dry runs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            run_dir = Path(scratch) / f"seed{seed}"
            command = [sys.executable, "-m", "neft_lab", "experiment=quickstart", f"seed={seed}",
                       f"hydra.run.dir={run_dir}", "logger=none", *args.extra]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            best = metrics["train"].get("best_checkpoint") or ""
            rows.append({
                "seed": seed,
                "before": {k: metrics["before"][k] for k in ("bleu", "chrf")},
                "after": {k: metrics["after"][k] for k in ("bleu", "chrf")},
                "best_checkpoint": Path(best).name if best else None,
                "wall_seconds": round(time.perf_counter() - started, 1),
            })  # fmt: skip
            print(f"seed {seed}: BLEU {rows[-1]['before']['bleu']:.2f} → {rows[-1]['after']['bleu']:.2f}, "
                  f"chrF {rows[-1]['before']['chrf']:.2f} → {rows[-1]['after']['chrf']:.2f}, "
                  f"best {rows[-1]['best_checkpoint']}, {rows[-1]['wall_seconds']:.0f} s")  # fmt: skip
    summary = {}
    for when in ("before", "after"):
        for metric in ("bleu", "chrf"):
            values = [r[when][metric] for r in rows]
            summary[f"{when}_{metric}"] = {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    result = {
        "command": "python -m neft_lab experiment=quickstart seed=<s>",
        "extra": args.extra,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "runs": rows,
        "summary": summary,
    }
    out = Path(args.out or Path(__file__).parent / "results" / "quickstart_seeds.json")
    atomic_write_json(out, result)
    print(json.dumps(summary, indent=1))
    print(f"→ {out}")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    main()
