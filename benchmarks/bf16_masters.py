"""Do NeFT's updates survive a bfloat16 model? The same few steps in float32, bf16 + float32 masters, pure bf16.

    python benchmarks/bf16_masters.py --model gemma3_270m      # the real Gemma-3-270M, CPU (a few minutes)
    python benchmarks/bf16_masters.py --model tiny

Each setting is a real `python -m neft_lab` run (in process): random-neuron NeFT (fused) at 9%, the
paper's lr 2e-5, linear decay, bf16 autocast, on the embedded task. The trained vectors come from
the run's compact delta (float32 masters where they exist); the base from the model's own weights
(rounded to bf16 for the bf16 runs). For each setting: the share of selected entries that moved, the
share whose moved/unmoved status agrees with the float32 run, and how the update compares with the
float32 run's (cosine, relative difference).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from neft_lab.config import compose
from neft_lab.io import atomic_write_json
from neft_lab.pipeline import run
from neft_lab.selection_workflow import base_weights

SETTINGS = {
    "float32 weights": ["model.dtype=float32"],
    "bf16 weights + float32 masters": ["model.dtype=bfloat16"],
    "bf16 weights, no masters": ["model.dtype=bfloat16", "optim.master_dtype=null"],
}


def updates(run_dir: Path, base, bf16: bool) -> torch.Tensor:
    """Trained minus base value of every selected entry, in one flat float64 tensor."""
    delta = load_file(str(run_dir / "neft_delta.safetensors"))
    parts = []
    for key in sorted(k for k in delta if k.endswith(".vectors")):
        module = key.removesuffix(".vectors")
        axis, indices = int(delta[f"{module}.axis"]), delta[f"{module}.indices"]
        weight = base.get(f"{module}.weight")
        if bf16:
            weight = weight.to(torch.bfloat16).float()
        parts.append((delta[key].double() - weight.index_select(axis, indices).double()).flatten())
    return torch.cat(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    results: dict = {
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "settings": {},
    }
    moved: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, extra in SETTINGS.items():
            run_dir = Path(scratch) / "".join(c if c.isalnum() else "_" for c in label)
            cfg = compose(
                [
                    f"model={args.model}",
                    "task=embedded",
                    "strategy=random_neuron",
                    "strategy.export_merged=false",
                    "logger=none",
                    "resume=false",
                    "trainer.precision=bf16-mixed",
                    f"trainer.max_steps={args.steps}",
                    f"trainer.val_check_interval={args.steps}",
                    "trainer.enable_progress_bar=false",
                    f"optim.lr={args.lr}",
                    f"loader.batch_size={args.batch}",
                    "task.data.embedded.n_val=8",
                    "eval.before=false",
                    "eval.after=false",
                    f"paths.run_dir={run_dir}",
                    *extra,
                ]
            )
            started = time.perf_counter()
            run(cfg)
            seconds = time.perf_counter() - started
            moved[label] = updates(run_dir, base_weights(cfg), bf16="bfloat16" in " ".join(extra))
            print(f"{label}: {seconds:.0f} s")
            results["settings"][label] = {"overrides": extra, "seconds": round(seconds, 1)}
    reference = moved["float32 weights"]
    for label, update in moved.items():
        entry = results["settings"][label]
        entry["selected_entries"] = int(update.numel())
        entry["share_moved"] = float((update != 0).double().mean())
        entry["moved_both_or_neither_vs_float32"] = float(((update != 0) == (reference != 0)).double().mean())
        entry["cosine_vs_float32"] = float(torch.nn.functional.cosine_similarity(update, reference, dim=0))
        entry["relative_difference_vs_float32"] = float((update - reference).norm() / reference.norm())
    out = Path(args.out or Path(__file__).parent / "results" / f"bf16_masters-{args.model}-cpu.json")
    atomic_write_json(out, results)
    print(
        f"{'setting':34} {'entries':>11} {'moved':>8} {'agree w/ fp32':>13} {'cos vs fp32':>12} {'rel. diff':>10}"
    )
    for label, entry in results["settings"].items():
        print(
            f"{label:34} {entry['selected_entries']:>11,} {entry['share_moved']:>8.2%} "
            f"{entry['moved_both_or_neither_vs_float32']:>13.4%} "
            f"{entry['cosine_vs_float32']:>12.4f} {entry['relative_difference_vs_float32']:>10.3f}"
        )
    print(f"→ {out}")


if __name__ == "__main__":
    main()
