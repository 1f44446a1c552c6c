"""What one job of the CPU table costs, before and after its speed-ups: a training step per method and an
evaluation (test loss + batched greedy generation with a KV cache) in float32 vs bf16 autocast.

The paper trains in bf16 autocast over float32 weights (docs/fidelity.md); on a CPU with AVX-512 BF16 the same
autocast makes a Gemma-3-270M step ~1.5x and generation ~2x faster than float32. Each measurement is the real
command (`python -m neft_lab`, a fresh process) on the real data, a few steps and a few test segments:

    python benchmarks/table_cpu_speed.py                       # ../shared/data, 4 steps, 32 test segments
    python benchmarks/table_cpu_speed.py --steps 2 --test 8    # quicker
    python benchmarks/table_cpu_speed.py --task alpaca_ifeval --precisions bf16-mixed --test 32   # Table 4's
    python benchmarks/table_cpu_speed.py --task alpaca_ifeval --precisions bf16-mixed --methods neft_9 --steps 50 \
        --val 16 --test 8 --extra loader.group_by_length=true --out /tmp/grouped.json   # and =false: the same 400
        # examples either way (table_cpu_speed-alpaca_ifeval-group_by_length.json holds both)

Writes benchmarks/results/table_cpu_speed.json (table_cpu_speed-alpaca_ifeval.json for the instruction task): per
(method, precision) the median step seconds, the seconds of one validation (200 pairs) and of the test evaluation,
and peak RSS. Needs ../shared/data (or NEFT_LAB_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neft_lab.curves import logged_step_times

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"full": ["strategy=full"], "neft_9": ["strategy=random_neuron", "budget=0.09"],
           "lora_match_9": ["strategy=lora", "strategy.r=match", "budget=0.09"]}  # fmt: skip
PRECISIONS = ("32-true", "bf16-mixed")
TASKS = {  # the task's data and generation settings, as scripts/table_small_cpu.sh passes them
    "wmt_zh_en": lambda data: [
        f"task.data.train_dir={data / 'wmt18-20_zh_en_train'}", f"task.data.test_dir={data / 'wmt21_zh_en'}",
        "task.max_new_tokens_ratio=2"],
    "alpaca_ifeval": lambda data: [
        f"task.data.train_file={data / 'instruct_alpaca' / 'train.jsonl'}",
        f"task.data.val_file={data / 'instruct_alpaca' / 'val.jsonl'}",
        f"task.data.test_file={data / 'ifeval' / 'input_data.jsonl'}", "task.max_new_tokens=256"],
}  # fmt: skip


def measure(
    task: str,
    method: str,
    precision: str,
    data: Path,
    steps: int,
    test: int,
    val: int,
    out: Path,
    extra: list[str],
) -> dict:
    run_dir = out / f"{method}-{precision}"
    command = [
        sys.executable, "-m", "neft_lab", "model=gemma3_270m", f"task={task}", "logger=csv", "resume=false",
        *TASKS[task](data), "task.truncate_source=true", f"task.data.max_test={test}", f"task.data.max_val={val}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"trainer.precision={precision}",
        "trainer.enable_progress_bar=false", "export.enabled=false", f"hydra.run.dir={run_dir}", *METHODS[method], *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} {precision} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = metrics["train"]
    step = train["step_seconds_median"]
    steps_logged = logged_step_times(
        run_dir
    )  # batches differ in length: the mean is what a run's time adds up
    return {
        "method": method,
        "precision": precision,
        "extra": extra,
        "step_seconds_median": round(step, 3),
        "step_seconds_mean": round(statistics.fmean(steps_logged), 3),
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
    parser.add_argument("--task", choices=sorted(TASKS), default="wmt_zh_en")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more overrides, e.g. loader.group_by_length=true"
    )
    parser.add_argument("--out", help="default: benchmarks/results/table_cpu_speed[-TASK].json")
    args = parser.parse_args()
    suffix = "" if args.task == "wmt_zh_en" else f"-{args.task}"
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"table_cpu_speed{suffix}.json")
    data = Path(args.data)
    needed = "wmt21_zh_en" if args.task == "wmt_zh_en" else "ifeval"
    if not (data / needed).is_dir():
        sys.exit(f"no {needed} data under {data}: pass --data or set NEFT_LAB_SHARED_DATA")
    import torch
    import transformers

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for precision in args.precisions.split(","):
                result = measure(
                    args.task, method, precision, data, args.steps, args.test, args.val, Path(tmp), args.extra
                )
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
        if (method, "32-true") in by and (method, "bf16-mixed") in by
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
