"""What scoring costs: the gradient scorer vs one step of the cosine scorer's full fine-tune reference.

The cosine scorer needs a reference: `selection.reference.steps` steps of full fine-tuning with AdamW
(weights, gradients and two optimizer states). The gradient scorer (`neurons/scorers/gradient.py`)
needs N forward + input-only backward passes, no weight gradient, no optimizer. Measured, each in a
fresh process so that peak memory does not leak between methods:

- ``forward``   inference floor: the same loss, forward only, under ``torch.no_grad``.
- ``gradient``  `gradient_scores` over warm-up + N batches (time per batch: between batches it asks for).
- ``full``      one full fine-tune step with AdamW = the cosine reference's cost per step
                (`benchmarks/neft_step.py`'s worker, same batch, same loss).
- ``lora``      (optional) one LoRA step, the `lora_reference` scorer's cost per step (same worker).

The batch and the loss are `neft_step.py`'s: seeded random tokens, `target_token_loss` on the last
half of each row (the same batch is fed N times: cost does not depend on its content). Memory: the
absolute peak (CPU: peak RSS, Linux ``/proc/self/clear_refs`` + VmHWM; CUDA: ``max_memory_allocated``),
and on CPU also its growth over the RSS after the model is built (which counts weights paged in
lazily from safetensors during the first pass, hence the absolute peak for comparisons). On a
shared machine the times vary with the load; compare ratios from one run.

    python benchmarks/scorer_memory.py --model tiny                                   # seconds
    python benchmarks/scorer_memory.py --model gemma3_270m --batches 3 --steps 2      # ~2-3 min CPU

Writes benchmarks/results/scorer_memory-<model>-<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import neft_step  # noqa: E402  (the model, batch, loss and memory meter of the step benchmark)

METHODS = ("forward", "gradient", "full", "lora")


def step_args(args: argparse.Namespace, worker: str) -> argparse.Namespace:
    """The step benchmark's settings for the same model, batch and threads."""
    argv = ["--model", args.model, "--device", args.device, "--steps", str(args.steps), "--warmup", "1"]
    for flag, value in (("--batch", args.batch), ("--seq", args.seq), ("--threads", args.threads)):
        if value:
            argv += [flag, str(value)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    step = neft_step.parse(argv)
    step.worker = worker
    return step


def timed(batches: list[dict[str, torch.Tensor]], times: list[float]) -> Iterator[dict[str, torch.Tensor]]:
    """Yields the batches and records the seconds the consumer spent on each."""
    for batch in batches:
        started = time.perf_counter()
        yield batch
        times.append(time.perf_counter() - started)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker in ("full", "lora"):
        record = neft_step.run_worker(step_args(args, args.worker))
        return {**record, "seconds_per_batch": record["step_s"]}
    from neft_lab.losses import target_token_loss
    from neft_lab.neurons.geometry import NeuronSpace
    from neft_lab.neurons.scorers.gradient import gradient_scores

    step = step_args(args, args.worker)
    torch.manual_seed(step.seed)
    if step.device == "cpu":
        torch.set_num_threads(step.threads)
    model = neft_step.build_model(step)
    batch = neft_step.make_batch(model.config.vocab_size, step)
    meter = neft_step.MemoryMeter(step.device)
    meter.start()
    times: list[float] = []
    record: dict[str, Any] = {"method": args.worker}
    if args.worker == "forward":
        model.eval()
        with torch.no_grad():
            for _ in range(1 + args.batches):
                started = time.perf_counter()
                target_token_loss(model, batch)
                times.append(time.perf_counter() - started)
    else:
        space = NeuronSpace.from_model(model)
        started = time.perf_counter()
        scores = gradient_scores(
            model,
            timed([batch] * (1 + args.batches), times),
            space,
            per_example=args.per_example,
            progress=False,
        )
        record["total_s"] = time.perf_counter() - started
        record["vectors"] = sum(s.numel() for s in scores.values())
        record["grads_left"] = sum(p.grad is not None for p in model.parameters())
    record.update(
        seconds_per_batch=statistics.median(times[1:]),
        warmup_s=times[0],
        batches=args.batches,
        peak_memory_bytes=meter.peak(),
        memory_baseline_bytes=meter.baseline,
        memory_kind=meter.kind,
    )
    return record


def run_method(method: str, argv: list[str]) -> dict[str, Any]:
    """One method in a fresh interpreter; its last JSON stdout line is the record."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", method], stdout=subprocess.PIPE, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "error": f"worker exited with {proc.returncode}"}
    record = json.loads(lines[-1])
    # CPU: the growth excludes the RSS of the loaded model, but weights read lazily from safetensors are
    # paged in during the first pass and counted as growth; the absolute peak compares methods fairly.
    absolute = record["peak_memory_bytes"] + (
        0 if record["memory_kind"].startswith("cuda") else record["memory_baseline_bytes"]
    )
    return {**record, "peak_absolute_bytes": absolute, "process_wall_s": time.perf_counter() - started}


def table(results: dict[str, dict[str, Any]]) -> str:
    full = results.get("full", {})
    rows = [
        "| method | s per batch/step | peak GiB (absolute) | growth GiB | peak vs full step | time vs full step |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        if "error" in r:
            rows.append(f"| {method} | {r['error']} | | | | |")
            continue
        mem = (
            r["peak_absolute_bytes"] / full["peak_absolute_bytes"]
            if full.get("peak_absolute_bytes")
            else None
        )
        sec = r["seconds_per_batch"] / full["seconds_per_batch"] if full.get("seconds_per_batch") else None
        rows.append(
            f"| {method} | {r['seconds_per_batch']:.3f} | {neft_step.gib(r['peak_absolute_bytes'])} "
            f"| {neft_step.gib(r['peak_memory_bytes'])} | {neft_step.fmt(mem)} | {neft_step.fmt(sec)} |"
        )
    return "\n".join(rows)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "gemma3_270m"), default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (neft_step's default)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (neft_step's default)")
    parser.add_argument(
        "--batches", type=int, default=3, help="gradient scorer: timed batches after 1 warm-up"
    )
    parser.add_argument("--steps", type=int, default=2, help="full/lora: timed steps after 1 warm-up")
    parser.add_argument("--methods", default="forward,gradient,full", help=f"comma separated, from {METHODS}")
    parser.add_argument("--per-example", action="store_true", help="gradient scorer: per-example Fisher")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        parser.error(f"unknown methods {bad}: choose from {METHODS}")
    return args


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    started = time.perf_counter()
    results = {}
    for method in args.methods.split(","):
        print(f"[scorer_memory] {method} ...", file=sys.stderr, flush=True)
        results[method] = run_method(method, sys.argv[1:])
    from neft_lab.io import atomic_write_json

    settings = step_args(args, "none")
    record = {
        "model": args.model,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": settings.threads if args.device == "cpu" else None,
        "dtype": settings.dtype,
        "batch": settings.batch,
        "seq": settings.seq,
        "loss": "target_token_loss, last half of positions",
        "gradient_batches": args.batches,
        "per_example": args.per_example,
        "full_steps": args.steps,
        "torch": torch.__version__,
        "command": "python benchmarks/scorer_memory.py " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - started,
        "results": results,
    }
    out = Path(__file__).parent / "results" / f"scorer_memory-{args.model}-{args.device.split(':')[0]}.json"
    atomic_write_json(out, record)
    kind = next((r["memory_kind"] for r in results.values() if "memory_kind" in r), "")
    print(
        f"\n{args.model} on {args.device}, {settings.dtype}, batch {settings.batch}x{settings.seq}; gradient: median of "
        f"{args.batches} batches, full/lora: median of {args.steps} steps, after 1 warm-up; memory: {kind}\n"
    )
    print(table(results))
    print(f"\n-> {out}  ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
