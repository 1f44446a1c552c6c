"""The static memory floor of each strategy: weights + gradients + AdamW state, by dtype (activations excluded).

    python benchmarks/memory_floor.py                    # Llama-2-7B's shapes (built on the meta device)
    python benchmarks/memory_floor.py --model gemma3_270m

What each strategy keeps in which dtype (training/precision.py): every trainable tensor is a float32
master (4 bytes) with a float32 gradient (4) and two float32 AdamW moments (8) = 16 bytes per trained
parameter; frozen weights cost their storage dtype (bf16 2 bytes, float32 4). With
`optim.master_dtype=null` and a bf16 model everything is bf16: 2 + 2 + 4 = 8 bytes per trained parameter.
Fused NeFT also keeps its selected slices inside the live (frozen-dtype) weight, counted in the frozen part.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from neft_lab.io import atomic_write_json
from neft_lab.models.loading import parameter_count
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.selection import Budget, budget_share, lora_parameter_count

CONFIGS = {
    "llama2_7b": lambda: LlamaConfig(),  # transformers' default LlamaConfig is Llama-2-7B's shape
    "gemma3_270m": lambda: Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
    ),  # fmt: skip
}
MASTER = 4 + 4 + 8  # float32 weight, gradient, AdamW exp_avg + exp_avg_sq


def floor(total: int, trained: int, frozen_bytes: int, trained_bytes: int = MASTER) -> float:
    """GB (1e9 bytes) for `trained` parameters at `trained_bytes` each and the rest at `frozen_bytes`."""
    return ((total - trained) * frozen_bytes + trained * trained_bytes) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2_7b", choices=sorted(CONFIGS))
    parser.add_argument("--budget", default="paper_9", help="NeFT budget: a share (0.09) or a paper point")
    parser.add_argument("--lora-r", type=int, default=256)
    args = parser.parse_args()

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIGS[args.model]())
    total = parameter_count(model)
    space = NeuronSpace.from_model(model)
    neft = Budget("share", budget_share(args.budget)).parameters(space, total)
    neft -= neft % space.groups[0].length  # whole vectors
    lora = lora_parameter_count(model, args.lora_r)
    embed = model.get_input_embeddings().weight.numel()
    in_out = space.num_parameters
    rows = [
        ("full, float32 masters (default)", "float32", total, floor(total, total, 4)),
        ("full, optim.master_dtype=null, bf16 model", "bf16", total, floor(total, total, 2, 2 + 2 + 4)),
        (f"LoRA r={args.lora_r}, bf16 base", "bf16 / float32", lora, floor(total + lora, lora, 2)),
        (f"NeFT fused {args.budget}, bf16 base", "bf16 / float32", neft, floor(total + neft, neft, 2)),
        (f"NeFT fused {args.budget}, float32 base", "float32", neft, floor(total + neft, neft, 4)),
        (
            "NeFT masked (authors': dense up/down), bf16 base",
            "bf16 / float32",
            in_out,
            floor(total, in_out, 2),
        ),
        ("NeFT masked (authors': dense up/down), float32", "float32", in_out, floor(total, in_out, 4)),
        ("FT-embed, bf16 base", "bf16 / float32", embed, floor(total, embed, 2)),
        ("FT-{in,out}, bf16 base", "bf16 / float32", in_out, floor(total, in_out, 2)),
    ]
    result = {
        "model": args.model,
        "total_parameters": total,
        "neft_budget": args.budget,
        "neft_parameters": neft,
        "lora_r": args.lora_r,
        "rows": [
            {"strategy": s, "frozen / trained dtype": d, "trained_parameters": n, "static_GB": round(gb, 1)}
            for s, d, n, gb in rows
        ],
    }
    out = Path(__file__).parent / "results" / f"memory_floor-{args.model}.json"
    atomic_write_json(out, result)
    print(
        f"{args.model}: {total:,} parameters; weights + gradients + AdamW, GB (1e9 bytes), activations excluded"
    )
    print("| strategy | frozen / trained dtype | trained parameters | static GB |\n|---|---|---|---|")
    for s, d, n, gb in rows:
        print(f"| {s} | {d} | {n / 1e6:,.1f}M | {gb:.1f} |")
    print(f"→ {out}")


if __name__ == "__main__":
    main()
