"""One training step (forward + backward + AdamW step): full fine-tuning vs LoRA vs NeFT variants.

Methods (``--methods``, comma separated):

- ``full``        every parameter trains.
- ``lora``        PEFT LoRA on all linear layers but the LM head (alpha 16, dropout 0), rank chosen
                  so that its parameters ≈ the NeFT budget (``--lora-r`` overrides).
- ``masked``      paper-style NeFT as `neuron.sliced` impl="masked": the whole weight of every
                  planned up/down module trains (dense grads and AdamW state), a hook zeroes the
                  gradient outside the selected vectors; all other parameters are frozen.
- ``masked_all``  (optional) the authors' literal setup, as in DESIGN's anchor table: the whole
                  model trains and every gradient outside the selected vectors is zeroed before
                  the optimizer step.
- ``fused``       our NeFT: slice-only weight gradients, slices written back with index_copy_.
- ``delta``       NeFT with a zero-initialised delta per module.

NeFT vectors are drawn at random (seeded) among all up_proj rows and down_proj columns, enough
to cover ``--budget`` × all parameters: this measures speed, not selection quality.

Loss: the framework's own `neft_lab.training.loss.target_token_loss` with the last half of each
row as target tokens (the LM head runs only there, through a boolean ``logits_to_keep`` mask);
``--loss full`` projects and scores every position. An integer ``logits_to_keep`` would hand the
head a non-contiguous slice, which a *frozen* head (LoRA, NeFT) multiplies with bmm on an expanded
weight instead of one mm: on CPU that made Gemma's 262k-row head backward ~25% slower.

Each method runs in a fresh subprocess, so memory numbers do not leak between methods:
CUDA: ``torch.cuda.max_memory_allocated`` (absolute, weights included); CPU: peak RSS growth
during the steps over the RSS after the model is built (Linux ``/proc/self/clear_refs`` resets
the high-water mark VmHWM; elsewhere ``resource.getrusage`` ru_maxrss, which cannot be reset).

    python benchmarks/neft_step.py --model tiny
    python benchmarks/neft_step.py --model gemma3_270m --batch 4 --seq 64 --steps 3
    python benchmarks/neft_step.py --model llama2_7b_shape            # CUDA GPU: bf16, 8x512, 9%
    python benchmarks/neft_step.py --model llama2_7b_shape --layers 2 --batch 1 --seq 32 --device cpu --dtype float32

Writes benchmarks/results/neft_step-<model>-<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("full", "lora", "masked", "fused", "delta")
ALL_METHODS = (*METHODS, "masked_all")
MODELS = ("tiny", "gemma3_270m", "llama2_7b_shape")
# The GPU targets (DESIGN / issue): Llama-2-7B shape, bf16, batch 8x512, budget 9%, LoRA r=256.
TARGETS = (
    ("fused step time ≤ 0.75× full", "time", "full", 0.75),
    ("fused step time ≤ 0.55× LoRA", "time", "lora", 0.55),
    ("fused peak memory ≤ 0.55× full", "memory", "full", 0.55),
)


# ----------------------------------------------------------------------------------------------
# Model, budget, plans


def build_model(args: argparse.Namespace) -> nn.Module:
    dtype = getattr(torch, args.dtype)
    if args.model == "llama2_7b_shape":
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=args.layers or 32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        with torch.device(args.device):  # random init directly on the device, in the target dtype
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        from neft_lab.config import compose
        from neft_lab.models.loading import load_model

        cfg = compose([f"model={args.model}", "paths.run_dir=/tmp/neft_step_unused"])
        model, _ = load_model(cfg.model)
        model = model.to(device=args.device, dtype=dtype)
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def mlp_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(up_proj, down_proj) module names per layer."""
    names = [n for n, _ in model.named_modules()]
    ups = [n for n in names if n.endswith("mlp.up_proj")]
    return [(up, up[: -len("up_proj")] + "down_proj") for up in ups]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def neft_plans(model: nn.Module, budget: float, seed: int) -> tuple[list[Any], int, int]:
    """Random up rows / down columns covering `budget` × all parameters; (plans, vectors, vector length)."""
    from neft_lab.neurons.sliced import SlicePlan

    pairs = mlp_modules(model)
    up0 = model.get_submodule(pairs[0][0])
    d_ff, d_model = up0.out_features, up0.in_features
    pool = 2 * len(pairs) * d_ff
    wanted = round(budget * parameter_count(model) / d_model)
    if wanted > pool:
        raise SystemExit(
            f"budget {budget} needs {wanted} vectors but the model has only {pool} up/down vectors"
        )
    chosen = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:wanted].sort().values
    plans = []
    for slot, (up, down) in enumerate(pairs):
        for kind, name, axis in ((0, up, 0), (1, down, 1)):
            start = (2 * slot + kind) * d_ff
            sel = chosen[(chosen >= start) & (chosen < start + d_ff)] - start
            if sel.numel():
                plans.append(SlicePlan(name, axis, sel))
    return plans, wanted, d_model


def lora_rank(model: nn.Module, budget: float) -> int:
    """LoRA r on all linear layers but the LM head whose parameter count ≈ the NeFT budget."""
    head = model.get_output_embeddings()
    per_rank = sum(
        m.in_features + m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    return max(1, round(budget * parameter_count(model) / per_rank))


# ----------------------------------------------------------------------------------------------
# Memory


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory during the timed steps: CUDA allocator peak, or CPU peak RSS growth."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = ""
        self.baseline = 0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.kind = "cuda max_memory_allocated (absolute)"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.baseline = _proc_status("VmRSS") or 0
            self.kind = "cpu peak RSS growth (VmHWM after clear_refs - VmRSS before)"
        except OSError:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = "cpu peak RSS growth (ru_maxrss, not resettable: lower bound)"

    def peak(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated()
        hwm = _proc_status("VmHWM") if "VmHWM" in self.kind else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, hwm - self.baseline)


# ----------------------------------------------------------------------------------------------
# One method in this process


def setup_method(model: nn.Module, method: str, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    from neft_lab.neurons import sliced

    info: dict[str, Any] = {}
    if method == "full":
        model.requires_grad_(True)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        r = args.lora_r or lora_rank(model, args.budget)
        info["lora_r"] = r
        config = LoraConfig(
            r=r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
    else:
        plans, vectors, length = neft_plans(model, args.budget, args.seed)
        info.update(vectors=vectors, vector_length=length, modules=len(plans))
        sliced.attach(model, plans, impl="masked" if method == "masked_all" else method)
        if method == "masked_all":
            model.requires_grad_(True)
            info["planned"] = {p.module for p in plans}
    return model, info


def make_batch(vocab: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    from neft_lab.data.encoding import IGNORE_INDEX

    ids = torch.randint(10, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    if args.loss == "half":
        labels[:, : args.seq - max(1, args.seq // 2)] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(args.device) for k, v in batch.items()}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    from neft_lab.training.loss import target_token_loss

    if args.loss == "half":
        return target_token_loss(model, batch)[0]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    from neft_lab.neurons import sliced

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args)
    total = parameter_count(model)
    model, info = setup_method(model, args.worker, args)
    if args.master_dtype == "float32":
        from neft_lab.training.precision import keep_trainable_in

        keep_trainable_in(model, torch.float32)
    half = getattr(torch, args.dtype) in (torch.bfloat16, torch.float16) and args.master_dtype == "float32"
    autocast = torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.dtype), enabled=half)
    planned = info.pop("planned", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    batch = make_batch(model.config.vocab_size, args)
    cuda = args.device.startswith("cuda")
    meter = MemoryMeter(args.device)
    meter.start()
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = loss_fn(model, batch, args)
        loss.backward()
        if planned is not None:  # masked_all: the authors zero every gradient outside the selected vectors
            for name, param in model.named_parameters():
                if param.grad is not None and name.removesuffix(".base.weight") not in planned:
                    param.grad.zero_()
        optimizer.step()
        if args.worker == "fused":
            sliced.sync(model)
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = times[args.warmup :]
    step = statistics.median(timed)
    return {
        "method": args.worker,
        "total_parameters": total,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "step_s": step,
        "steps_s": timed,
        "warmup_s": times[: args.warmup],
        "tokens_per_s": args.batch * args.seq / step,
        "peak_memory_bytes": meter.peak(),
        "memory_baseline_bytes": meter.baseline,
        "memory_kind": meter.kind,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        **info,
    }


# ----------------------------------------------------------------------------------------------
# Driver


def run_method(method: str, argv: list[str]) -> dict[str, Any]:
    """Run one method in a fresh interpreter; its last stdout line is the JSON record."""
    cmd = [sys.executable, __file__, *argv, "--worker", method]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "error": f"worker exited with {proc.returncode}"}
    return json.loads(lines[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.3f}" if n < 2**30 else f"{n / 2**30:.2f}"


def ratio(results: dict[str, dict[str, Any]], method: str, ref: str, key: str) -> float | None:
    a, b = results.get(method, {}), results.get(ref, {})
    if key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| method | trainable | step s | tokens/s | peak mem GiB | time vs full | time vs LoRA | mem vs full | mem vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        if "error" in r:
            rows.append(f"| {method} | {r['error']} | | | | | | | |")
            continue
        label = f"lora r={r['lora_r']}" if method == "lora" else method
        rows.append(
            f"| {label} | {r['trainable_parameters'] / 1e6:,.2f}M | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
            f"| {gib(r['peak_memory_bytes'])} | {fmt(ratio(results, method, 'full', 'step_s'))} "
            f"| {fmt(ratio(results, method, 'lora', 'step_s'))} "
            f"| {fmt(ratio(results, method, 'full', 'peak_memory_bytes'))} "
            f"| {fmt(ratio(results, method, 'lora', 'peak_memory_bytes'))} |"
        )
    return "\n".join(rows)


def targets(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for label, what, ref, limit in TARGETS:
        key = "step_s" if what == "time" else "peak_memory_bytes"
        value = ratio(results, "fused", ref, key)
        out.append(
            {
                "target": label,
                "ratio": value,
                "limit": limit,
                "met": None if value is None else value <= limit,
            }
        )
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument(
        "--layers", type=int, default=None, help="llama2_7b_shape only: number of layers (32)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default 8 (4 for gemma3_270m on cpu)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (64 on cpu)")
    parser.add_argument("--budget", type=float, default=0.09, help="share of all parameters")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 (default bf16 on cuda, fp32 on cpu)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma separated, from {ALL_METHODS}")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: matched to the budget)")
    parser.add_argument("--loss", choices=("half", "full"), default="half")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: 1 for tiny, all cores otherwise)"
    )
    parser.add_argument(
        "--master-dtype",
        choices=("none", "float32"),
        default="none",
        help="float32: trainable tensors in float32 (what `python -m neft_lab` trains with) and, for a bf16 "
        "model, bf16 autocast; none: every tensor in --dtype (the kernels alone, as DESIGN's anchors)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.batch = args.batch or (4 if cpu and args.model == "gemma3_270m" else 8)
    args.seq = args.seq or (64 if cpu else 512)
    args.threads = args.threads or (1 if args.model == "tiny" else os.cpu_count() or 1)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    bad = [m for m in args.methods.split(",") if m not in ALL_METHODS]
    if bad:
        parser.error(f"unknown methods {bad}: choose from {ALL_METHODS}")
    return args


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    passthrough = list(sys.argv[1:])
    results = {}
    for method in args.methods.split(","):
        print(f"[neft_step] {method} ...", file=sys.stderr, flush=True)
        results[method] = run_method(method, passthrough)
        if "error" not in results[method]:
            r = results[method]
            print(
                f"[neft_step] {method}: {r['step_s']:.3f} s, peak {gib(r['peak_memory_bytes'])} GiB",
                file=sys.stderr,
            )
    checks = targets(results, args)
    from neft_lab.io import atomic_write_json

    record = {
        "model": args.model,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": args.threads if args.device == "cpu" else None,
        "dtype": args.dtype,
        "master_dtype": args.master_dtype,
        "batch": args.batch,
        "seq": args.seq,
        "layers": args.layers,
        "budget": args.budget,
        "loss": "target_token_loss, last half of positions" if args.loss == "half" else "all positions",
        "grad_ckpt": args.grad_ckpt,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "command": "python benchmarks/neft_step.py " + " ".join(sys.argv[1:]),
        "results": results,
        "targets": checks,
    }
    out = Path(__file__).parent / "results" / f"neft_step-{args.model}-{args.device.split(':')[0]}.json"
    atomic_write_json(out, record)
    mem = next((r["memory_kind"] for r in results.values() if "memory_kind" in r), "")
    print(
        f"\n{args.model} on {args.device} ({record['device_name']}), {args.dtype}, batch {args.batch}x{args.seq}, "
        f"budget {args.budget:.0%}, loss on {record['loss']}, median of {args.steps} steps after {args.warmup} "
        f"warm-up; memory: {mem}\n"
    )
    print(table(results))
    reference = (
        args.model == "llama2_7b_shape"
        and not args.layers
        and args.device.startswith("cuda")
        and args.dtype == "bfloat16"
        and (args.batch, args.seq) == (8, 512)
        and abs(args.budget - 0.09) < 1e-9
    )
    note = (
        ""
        if reference
        else " (targets are set for llama2_7b_shape, CUDA, bf16, 8x512, 9%: indicative only here)"
    )
    print(f"\nTargets{note}:")
    for c in checks:
        status = "n/a" if c["met"] is None else ("MET" if c["met"] else "NOT MET")
        print(f"- {c['target']}: {fmt(c['ratio'])} -> {status}")
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
