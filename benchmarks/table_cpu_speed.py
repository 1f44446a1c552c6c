"""What one job of the CPU table costs, before and after its speed-ups: a training step per method and an
evaluation (test loss + batched greedy generation with a KV cache) in float32 vs bf16 autocast.

The paper trains in bf16 autocast over float32 weights (docs/fidelity.md); on a CPU with AVX-512 BF16 the same
autocast makes a Gemma-3-270M step ~1.5x and generation ~2x faster than float32. Each measurement is the real
command (`python -m neft_lab`, a fresh process) on the real data, a few steps and a few test segments:

    python benchmarks/table_cpu_speed.py                       # ../shared/data, 4 steps, 32 test segments
    python benchmarks/table_cpu_speed.py --steps 2 --test 8    # quicker

Writes benchmarks/results/table_cpu_speed.json: per (method, precision) the median step seconds, the seconds of
one validation (200 pairs) and of the test evaluation, and peak RSS. Needs ../shared/data (or NEFT_LAB_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"full": ["strategy=full"], "neft_9": ["strategy=random_neuron", "budget=0.09"],
           "lora_match_9": ["strategy=lora", "strategy.r=match", "budget=0.09"]}  # fmt: skip
PRECISIONS = ("32-true", "bf16-mixed")


def measure(method: str, precision: str, data: Path, steps: int, test: int, val: int, out: Path) -> dict:
    run_dir = out / f"{method}-{precision}"
    command = [
        sys.executable, "-m", "neft_lab", "model=gemma3_270m", "task=wmt_zh_en", "logger=csv", "resume=false",
        f"task.data.train_dir={data / 'wmt18-20_zh_en_train'}", f"task.data.test_dir={data / 'wmt21_zh_en'}",
        "task.truncate_source=true", "task.max_new_tokens_ratio=2", f"task.data.max_test={test}", f"task.data.max_val={val}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"trainer.precision={precision}",
        "trainer.enable_progress_bar=false", "export.enabled=false", f"hydra.run.dir={run_dir}", *METHODS[method],
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} {precision} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = metrics["train"]
    step = train["step_seconds_median"]
    return {
        "method": method,
        "precision": precision,
        "step_seconds_median": round(step, 3),
        "validation_seconds": round(train["seconds"] - step * steps, 1),  # the one validation, roughly
        "test_seconds": metrics["after"]["seconds"],
        "test_segments": metrics["after"]["n"],
        "test_loss": metrics["after"].get("loss"),
        "peak_rss_gib": round(train["peak_memory_bytes"] / 2**30, 2),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=os.environ.get("NEFT_LAB_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "table_cpu_speed.json"))
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "wmt21_zh_en").is_dir():
        sys.exit(f"no WMT data under {data}: pass --data or set NEFT_LAB_SHARED_DATA")
    import torch
    import transformers

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for precision in PRECISIONS:
                result = measure(method, precision, data, args.steps, args.test, args.val, Path(tmp))
                print(json.dumps(result), flush=True)
                results.append(result)
    by = {(r["method"], r["precision"]): r for r in results}
    speedups = {
        method: {
            "step": round(
                by[(method, "32-true")]["step_seconds_median"]
                / by[(method, "bf16-mixed")]["step_seconds_median"],
                2,
            ),
            "test": round(
                by[(method, "32-true")]["test_seconds"] / by[(method, "bf16-mixed")]["test_seconds"], 2
            ),
        }
        for method in args.methods.split(",")
    }
    report = {
        "settings": vars(args),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "results": results,
        "speedup_bf16_over_fp32": speedups,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(speedups))


if __name__ == "__main__":
    main()
