"""Training step time with logits at every position vs only at the target positions.

Gemma-3's 262k-token LM head dominates a small model's cost; `target_token_loss` projects only the
positions the loss reads. Run:

    python benchmarks/loss_head.py --model gemma3_270m --batch 8 --prompt 32 --target 16 --steps 5
    python benchmarks/loss_head.py --model tiny   # seconds, any machine

Writes benchmarks/results/loss_head-<model>-<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neft_lab.config import compose
from neft_lab.io import atomic_write_json
from neft_lab.losses import IGNORE_INDEX, target_token_loss
from neft_lab.models.loading import load_model


def all_position_loss(model, batch):
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def make_batch(vocab: int, batch: int, prompt: int, target: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, prompt + target), generator=generator)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def time_steps(model, batch, loss_fn, steps: int, device: str) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(model, batch)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="a conf/model option (tiny, gemma3_270m, ...)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--target", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    cfg = compose([f"model={args.model}", "paths.run_dir=/tmp/unused"])
    model, _ = load_model(cfg.model)
    model = model.to(args.device).train()
    batch = make_batch(model.config.vocab_size, args.batch, args.prompt, args.target, args.device)
    with torch.no_grad():
        torch.testing.assert_close(
            target_token_loss(model, batch)[0], all_position_loss(model, batch), rtol=1e-4, atol=1e-4
        )
    results = {}
    for name, fn in (("all positions", all_position_loss), ("target positions only", target_token_loss)):
        times = time_steps(model, batch, fn, args.steps, args.device)
        results[name] = {"median_s": statistics.median(times), "steps": times}
    speedup = results["all positions"]["median_s"] / results["target positions only"]["median_s"]
    record = {
        "model": args.model,
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "prompt": args.prompt,
        "target": args.target,
        "torch": torch.__version__,
        "results": results,
        "speedup": speedup,
    }
    out = Path(__file__).parent / "results" / f"loss_head-{args.model}-{args.device}.json"
    atomic_write_json(out, record)
    print(
        f"{args.model} on {args.device}, full fine-tuning step, batch {args.batch}x{args.prompt + args.target} "
        f"({args.target} target tokens per row), median of {args.steps}:"
    )
    for name, r in results.items():
        print(f"  {name:<22} {r['median_s']:.3f} s")
    print(f"  speedup {speedup:.2f}x  -> {out}")


if __name__ == "__main__":
    main()
