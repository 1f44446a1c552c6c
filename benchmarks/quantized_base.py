"""NeFT's step time and peak memory on a float32, a bf16 and a 4-bit (NF4) frozen base, side by side (CPU or CUDA).

Gemma-3-270M (`model=gemma3_270m`: the PyPI GGUF, converted once into the cache), NeFT fused at 9% random
vectors, AdamW on float32 masters, a batch of 4 × 128 tokens; each base in a fresh process so that its peak
resident memory is its own. The 4-bit base is bitsandbytes NF4 over the decoder's linear layers
(`model.quantization=nf4`, `neurons/quantized.py`) with everything else in bf16 and bf16 compute, as QLoRA runs;
its peak resident memory includes loading the bf16 model before its linears are quantized.

    python benchmarks/quantized_base.py                       # writes benchmarks/results/quantized_base_cpu.json
    python benchmarks/quantized_base.py --model tiny --steps 3   # the tiny model: seconds (what the test runs)
    python benchmarks/quantized_base.py --device cuda --out benchmarks/results/quantized_base-cuda.json
                                                              # on a GPU (benchmarks/gpu_suite.sh's `quant` item):
                                                              # peak = torch.cuda.max_memory_allocated
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BASES = ("float32", "bfloat16", "nf4")


def one(base: str, model_name: str, steps: int, threads: int, device: str = "cpu") -> dict:
    from neft_lab import NeuronConfig, get_neuron_model
    from neft_lab.config import compose
    from neft_lab.models.loading import load_model
    from neft_lab.neurons.quantized import quantize_frozen_linears

    torch.set_num_threads(threads)
    dtype = "float32" if base == "float32" else "bfloat16"  # nf4: embeddings, norms, head and compute in bf16
    model, _ = load_model(compose([f"model={model_name}", f"model.dtype={dtype}"]).model)
    model.to(device)  # bitsandbytes quantizes on the device the layer is on
    started = time.perf_counter()
    model = get_neuron_model(model, NeuronConfig(method="random", budget=0.09, impl="fused", seed=0))
    if base == "nf4":
        quantize_frozen_linears(model.hf_model, "nf4", torch.bfloat16)
    setup_s = time.perf_counter() - started
    static = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.hf_model.config.vocab_size
    batch = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.startswith("cuda")
    times, losses = [], []
    for step in range(steps + 2):  # two warm-up steps
        began = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - began)
        losses.append(round(loss.item(), 4))
    return {
        "base": base,
        "model": model_name,
        "threads": threads,
        "trainable": sum(p.numel() for p in trainable),
        "static_mib": round(static / 2**20, 1),  # parameters and buffers as stored (4-bit: packed + scales)
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "device": device,
        "step_s_median": round(statistics.median(times), 3),
        "setup_s": round(setup_s, 1),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model name: gemma3_270m or tiny")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after two warm-up steps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized_base_cpu.json"))
    parser.add_argument("--one", choices=BASES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model, args.steps, args.threads, args.device)))
        return
    rows = []
    for base in BASES:
        command = [sys.executable, __file__, "--one", base, "--model", args.model, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--device", args.device]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{base}: failed\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    peak = "peak CUDA MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"| base | static MiB | {peak} | step s (median, {args.device}) | trainable |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        shown = r["peak_cuda_mib"] if r["peak_cuda_mib"] is not None else r["peak_rss_mib"]
        print(
            f"| {r['base']} | {r['static_mib']:,.0f} | {shown:,.0f} | {r['step_s_median']:.2f} | {r['trainable']:,} |"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
