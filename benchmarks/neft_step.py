"""One training step (forward + backward + AdamW step): full fine-tuning vs LoRA vs NeFT variants.

Methods (``--methods``, comma separated):

- ``full``        every parameter trains.
- ``lora``        PEFT LoRA on all linear layers but the LM head (alpha 16, dropout 0), rank chosen
                  so that its parameters ≈ the NeFT budget (``--lora-r`` overrides).
- ``lora_r<N>``   the same at rank N, e.g. ``lora_r256`` (the paper's LoRA) and ``lora_r16``; several
                  ranks can run side by side.
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

Loss: the framework's own `neft_lab.losses.target_token_loss` with the last half of each
row as target tokens (the LM head runs only there, through a boolean ``logits_to_keep`` mask);
``--loss full`` projects and scores every position. An integer ``logits_to_keep`` would hand the
head a non-contiguous slice, which a *frozen* head (LoRA, NeFT) multiplies with bmm on an expanded
weight instead of one mm: on CPU that made Gemma's 262k-row head backward ~25% slower.

``--isolation process`` (the default on CUDA) runs the methods in this one process, one after another,
each on a freshly built model (same seed, same weights); between methods every reference is dropped and
the CUDA cache emptied, and the peak counter is reset after the model is built, so each method's peak is
its own: CUDA ``torch.cuda.max_memory_allocated`` (absolute, weights included). ``--isolation
subprocess`` (the default on the CPU) runs each method in a fresh interpreter instead: CPU memory is peak
RSS growth during the steps over the RSS after the model is built (Linux ``/proc/self/clear_refs`` resets
the high-water mark VmHWM; elsewhere ``resource.getrusage`` ru_maxrss, which cannot be reset), and freed
CPU memory is not always returned to the OS within one process.

    python benchmarks/neft_step.py --model tiny
    python benchmarks/neft_step.py --model gemma3_270m --batch 4 --seq 64 --steps 3
    python benchmarks/neft_step.py --model llama2_7b_shape            # CUDA GPU: bf16, 8x512, 9%, issue 12's six methods
    python benchmarks/neft_step.py --model llama2_7b_shape --layers 2 --width-div 16 --batch 1 --seq 32 --device cpu  # CPU trial

Writes benchmarks/results/neft_step-<model>-<device>.json (``-trial`` added when a llama2_7b_shape run is
shrunk or off the target setup: such numbers are no evidence for the targets) and prints a Markdown table
headed by the device name, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
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
ALL_METHODS = (*METHODS, "masked_all", "lora_r<N>")
# Issue 12 on the Llama-2-7B shape: full, the authors' dense masked NeFT, LoRA r=256 and r=16 (PEFT), ours;
# in priority order (the targets need fused, full and LoRA r=256), should a time limit stop the run early.
GPU_METHODS = ("fused", "full", "lora_r256", "masked", "delta", "lora_r16")
LORA_RANK = re.compile(r"lora_r(\d+)$")
MODELS = ("tiny", "gemma3_270m", "llama2_7b_shape")
# The GPU targets (DESIGN / issue 12): Llama-2-7B shape, bf16, batch 8x512, budget 9%, LoRA r=256; with the
# ratios a 60-line prototype reached on the H200 ("beat it").
TARGETS = (
    ("fused step time ≤ 0.75× full", "time", "full", 0.75, 0.78),
    ("fused step time ≤ 0.55× LoRA r=256", "time", "lora_r256", 0.55, 0.42),
    ("fused peak memory ≤ 0.55× full", "memory", "full", 0.55, 0.56),
)


# ----------------------------------------------------------------------------------------------
# Model, budget, plans


def build_model(args: argparse.Namespace) -> nn.Module:
    dtype = getattr(torch, args.dtype)
    if args.model == "llama2_7b_shape":
        from transformers import AutoModelForCausalLM, LlamaConfig

        div = args.width_div  # CPU trials: vocabulary and every width / div, head size kept at 128
        config = LlamaConfig(
            vocab_size=32000 // div,
            hidden_size=4096 // div,
            intermediate_size=11008 // div,
            num_hidden_layers=args.layers or 32,
            num_attention_heads=32 // div,
            num_key_value_heads=32 // div,
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
    elif method == "lora" or LORA_RANK.match(method):
        from peft import LoraConfig, get_peft_model

        fixed = LORA_RANK.match(method)
        r = int(fixed.group(1)) if fixed else args.lora_r or lora_rank(model, args.budget)
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
    from neft_lab.losses import IGNORE_INDEX

    ids = torch.randint(10, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    if args.loss == "half":
        labels[:, : args.seq - max(1, args.seq // 2)] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(args.device) for k, v in batch.items()}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    from neft_lab.losses import target_token_loss

    if args.loss == "half":
        return target_token_loss(model, batch)[0]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())


def measure(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Build the model, set `method` up, time warm-up + timed steps; the record of one method."""
    from neft_lab.neurons import sliced

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args)
    total = parameter_count(model)
    model, info = setup_method(model, method, args)
    if args.master_dtype == "float32":
        from neft_lab.masters import keep_trainable_in

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
        if method == "fused":
            sliced.sync(model)
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = times[args.warmup :]
    step = statistics.median(timed)
    return {
        "method": method,
        "total_parameters": total,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
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


def release_memory(device: str) -> int:
    """Drop what the last method left (its objects are out of scope by now); the bytes still allocated."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def run_in_process(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One method in this process; an out-of-memory error is a result (the next method still runs)."""
    leftover = release_memory(args.device)
    try:
        record = measure(args, method)
    except torch.OutOfMemoryError as err:
        record = {"method": method, "error": f"out of memory: {str(err).splitlines()[0][:200]}"}
    except (Exception, SystemExit) as err:  # noqa: BLE001 - one broken method must not cost the others' numbers
        record = {"method": method, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    record["allocated_before_bytes"] = leftover  # > 0: an earlier method leaked into this one's peak
    release_memory(args.device)
    return record


def gib(n: float) -> str:
    return f"{n / 2**30:.3f}" if n < 2**30 else f"{n / 2**30:.2f}"


def ratio(results: dict[str, dict[str, Any]], method: str, ref: str, key: str) -> float | None:
    a, b = results.get(method, {}), results.get(ref, {})
    if key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def lora_reference(results: dict[str, dict[str, Any]]) -> str:
    """The LoRA the other methods are compared with: r=256 (the paper's) when it ran, else the matched one."""
    return "lora_r256" if "lora_r256" in results else "lora"


def table(results: dict[str, dict[str, Any]]) -> str:
    lora = lora_reference(results)
    lora_label = f"LoRA r={results.get(lora, {}).get('lora_r', '?')}"
    rows = [
        f"| method | trainable | step s | tokens/s | peak mem GiB | time vs full | time vs {lora_label} "
        f"| mem vs full | mem vs {lora_label} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        if "error" in r:
            rows.append(f"| {method} | {r['error']} | | | | | | | |")
            continue
        label = f"lora r={r['lora_r']}" if "lora_r" in r else method
        rows.append(
            f"| {label} | {r['trainable_parameters'] / 1e6:,.2f}M | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
            f"| {gib(r['peak_memory_bytes'])} | {fmt(ratio(results, method, 'full', 'step_s'))} "
            f"| {fmt(ratio(results, method, lora, 'step_s'))} "
            f"| {fmt(ratio(results, method, 'full', 'peak_memory_bytes'))} "
            f"| {fmt(ratio(results, method, lora, 'peak_memory_bytes'))} |"
        )
    return "\n".join(rows)


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's ratios of fused NeFT against full / LoRA r=256 (else the matched LoRA), met or not."""
    out = []
    for label, what, ref, limit, prototype in TARGETS:
        if ref.startswith("lora") and lora_reference(results) != ref and "lora" in results:
            ref = "lora"  # a run without lora_r256: the matched (or --lora-r) LoRA stands in, and says so
            label = f"{label.split(' LoRA')[0]} LoRA r={results['lora'].get('lora_r')}"
        key = "step_s" if what == "time" else "peak_memory_bytes"
        value = ratio(results, "fused", ref, key)
        out.append(
            {
                "target": label,
                "reference_method": ref,
                "ratio": value,
                "limit": limit,
                "met": None if value is None else value <= limit,
                "prototype_ratio": prototype,
                "beats_prototype": None if value is None else value < prototype,
            }
        )
    return out


def reference_setup(args: argparse.Namespace) -> bool:
    """Whether this run is the issue's target setup (only then do the targets mean anything)."""
    return (
        args.model == "llama2_7b_shape"
        and not args.layers
        and args.width_div == 1
        and args.device.startswith("cuda")
        and args.dtype == "bfloat16"
        and (args.batch, args.seq) == (8, 512)
        and abs(args.budget - 0.09) < 1e-9
        and args.steps >= 5
    )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Hardware and versions: every result file names what it was measured on."""
    import peft
    import transformers

    cuda = args.device.startswith("cuda")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument(
        "--layers", type=int, default=None, help="llama2_7b_shape only: number of layers (32)"
    )
    parser.add_argument(
        "--width-div",
        type=int,
        default=1,
        help="llama2_7b_shape only: divide vocabulary, hidden, MLP and head counts by this (CPU trials; 1: the "
        "real shape)",
    )
    parser.add_argument("--batch", type=int, default=None, help="default 8 (4 for gemma3_270m on cpu)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (64 on cpu)")
    parser.add_argument("--budget", type=float, default=0.09, help="share of all parameters")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed first steps (default 2 on cuda, 1 on cpu)"
    )
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 (default bf16 on cuda, fp32 on cpu)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma separated, from {ALL_METHODS} (default: {','.join(GPU_METHODS)} for llama2_7b_shape, "
        f"else {','.join(METHODS)})",
    )
    parser.add_argument(
        "--isolation",
        choices=("process", "subprocess"),
        default=None,
        help="process: all methods in this process, one after another (default on cuda); subprocess: a fresh "
        "interpreter per method (default on cpu, where RSS is the memory measure)",
    )
    parser.add_argument(
        "--out", default=None, help="the JSON file (default: benchmarks/results/neft_step-...)"
    )
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
    args.warmup = args.warmup if args.warmup is not None else (2 if args.device.startswith("cuda") else 1)
    args.isolation = args.isolation or ("process" if args.device.startswith("cuda") else "subprocess")
    args.methods = args.methods or ",".join(GPU_METHODS if args.model == "llama2_7b_shape" else METHODS)
    if args.width_div < 1 or 32 % args.width_div:
        parser.error("--width-div must divide 32 (the head count)")
    bad = [m for m in args.methods.split(",") if m not in ALL_METHODS and not LORA_RANK.match(m)]
    if bad:
        parser.error(f"unknown methods {bad}: choose from {ALL_METHODS}")
    return args


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(measure(args, args.worker)))
        return
    env = environment(args)
    reference = reference_setup(args)
    print(
        f"[neft_step] {args.model} on {env['device_name']} ({args.device}), torch {env['torch']}, "
        f"{env['date_utc']}; methods {args.methods} ({args.isolation})",
        file=sys.stderr,
        flush=True,
    )
    from neft_lab.io import atomic_write_json

    results: dict[str, dict[str, Any]] = {}
    record = {
        "model": args.model,
        "device": args.device,
        **env,
        "reference_setup": reference,
        "note": None
        if reference
        else "not the target setup (llama2_7b_shape, CUDA, bf16, 8x512, 9%, full width and depth): "
        "a trial, no evidence for the targets",
        "threads": args.threads if args.device == "cpu" else None,
        "dtype": args.dtype,
        "master_dtype": args.master_dtype,
        "batch": args.batch,
        "seq": args.seq,
        "layers": args.layers,
        "width_div": args.width_div,
        "budget": args.budget,
        "loss": "target_token_loss, last half of positions" if args.loss == "half" else "all positions",
        "grad_ckpt": args.grad_ckpt,
        "steps": args.steps,
        "warmup": args.warmup,
        "isolation": args.isolation,
        "command": "python benchmarks/neft_step.py " + " ".join(sys.argv[1:]),
        "results": results,
        "targets": [],
    }
    trial = "-trial" if args.model == "llama2_7b_shape" and not reference else ""
    default = f"neft_step-{args.model}-{args.device.split(':')[0]}{trial}.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / default
    passthrough = list(sys.argv[1:])
    started = time.perf_counter()
    for method in args.methods.split(","):
        print(
            f"[neft_step] {method} ... ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True
        )
        if args.isolation == "process":
            results[method] = run_in_process(method, args)
        else:
            results[method] = run_method(method, passthrough)
        r = results[method]
        if "error" in r:
            print(f"[neft_step] {method}: {r['error']}", file=sys.stderr, flush=True)
        else:
            print(
                f"[neft_step] {method}: {r['step_s']:.3f} s/step, peak {gib(r['peak_memory_bytes'])} GiB",
                file=sys.stderr,
                flush=True,
            )
        # after every method: a run stopped at a time limit keeps what it measured
        record["targets"] = checks = targets(results)
        atomic_write_json(out, record)
    mem = next((r["memory_kind"] for r in results.values() if "memory_kind" in r), "")
    print(
        f"\n{args.model} on {args.device} ({record['device_name']}), torch {env['torch']}, {env['date_utc']}; "
        f"{args.dtype}, batch {args.batch}x{args.seq}, budget {args.budget:.0%}, loss on {record['loss']}, "
        f"median of {args.steps} steps after {args.warmup} warm-up; memory: {mem}\n"
    )
    print(table(results))
    checks = targets(results)
    note = "" if reference else " (a trial off the target setup: indicative only)"
    print(f"\nTargets{note}:")
    for c in checks:
        status = "n/a" if c["met"] is None else ("MET" if c["met"] else "NOT MET")
        print(f"- {c['target']}: {fmt(c['ratio'])} -> {status} (prototype {c['prototype_ratio']:.2f}×)")
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
