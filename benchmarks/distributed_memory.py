"""What each strategy keeps per rank at Llama-2-7B and Llama-2-70B shapes, under DDP and FSDP2 with N GPUs.

Arithmetic, not a measurement: the models are built on the meta device (no weights, seconds on a CPU) and the
counts come from the code's own parameter lists: `select_neurons(model, budget=...)` for NeFT's vectors,
`matched_rank` / `lora_parameter_count` for LoRA's rank-matched adapters, the model's parameters for full
fine-tuning. Bytes per parameter follow what the code keeps (docs/distributed.md):

- frozen weights in the model's dtype (bf16: 2 B);
- trainable tensors as float32 masters (`optim.master_dtype=float32`): 4 B, plus a float32 gradient (4 B) and
  AdamW's two float32 moments (8 B). Full fine-tuning's weights are its masters (16 B per parameter); NeFT's
  fused vectors are copies beside the bf16 weight they are written into (2 B + 16 B per selected entry);
- DDP: all of it on every rank. FSDP2 (`trainer=fsdp`): all of it sharded over the N ranks, plus the
  gathered working set: two decoder layers unsharded at once (the one computing, the one prefetched).

Activations, the CUDA context and allocator slack are not counted: they depend on batch and sequence length.

`--nf4` adds one GPU with the frozen base in 4 bits (`model.quantization=nf4`): the decoder's linear layers at
the bytes per weight bitsandbytes actually stores (measured by quantizing one matrix: packed NF4 plus its
double-quantized block scales), embeddings, norms and the LM head in bf16; NeFT also keeps the dequantized
selected slice (2 B per trained value, `SlicedLinear.base_slice`).

    python benchmarks/distributed_memory.py                      # the table of docs/distributed.md
    python benchmarks/distributed_memory.py --gpus 1 2 4 8 --budget 0.03
    python benchmarks/distributed_memory.py --nf4             # also: one GPU, bf16 vs NF4 frozen base
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neft_lab.library import select_neurons
from neft_lab.neurons.selection import lora_parameter_count
from neft_lab.strategies.lora import matched_rank

SHAPES = {  # the Hugging Face configs of meta-llama/Llama-2-7b-hf and Llama-2-70b-hf
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip
FROZEN, MASTER, GRAD, ADAM = 2, 4, 4, 8  # bytes per parameter
GIB = 2**30


def strategy_counts(model: torch.nn.Module, budget: float | str) -> dict[str, dict[str, int]]:
    """Per strategy: parameters kept frozen in bf16, trainable float32 masters, and extra bf16 copies."""
    total = sum(p.numel() for p in model.parameters())
    neurons = select_neurons(model, budget=budget, method="random").num_parameters  # the count, not which
    share = neurons / total
    rank = matched_rank(model, share)
    lora = lora_parameter_count(model, rank)
    return {
        "full": {"frozen": 0, "trainable": total, "rank": 0},
        f"LoRA r={rank} (matched)": {"frozen": total, "trainable": lora, "rank": rank},
        "NeFT fused / delta": {"frozen": total, "trainable": neurons, "rank": 0},
    }


def per_rank_gib(counts: dict[str, int], layer_params: int, layers: int, gpus: int, fsdp: bool) -> float:
    frozen, trainable = counts["frozen"], counts["trainable"]
    whole = frozen * FROZEN + trainable * (MASTER + GRAD + ADAM)
    if not fsdp:
        return whole / GIB
    trainable_per_layer = trainable / layers  # the trainable tensors sit in the decoder layers
    gathered = 2 * (
        layer_params * (FROZEN if frozen else MASTER) + (trainable_per_layer * MASTER if frozen else 0)
    )
    return (whole / gpus + gathered) / GIB


def nf4_bytes_per_weight() -> float:
    """Bytes per weight of a bitsandbytes NF4 matrix, its block scales included (a [1024, 4096] example)."""
    from neft_lab.neurons.quantized import quantize_linear

    layer = quantize_linear(torch.nn.Linear(4096, 1024, bias=False), "nf4", torch.bfloat16)
    state = layer.weight.quant_state.as_dict(packed=True)
    scales = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return (layer.weight.data.numel() * layer.weight.data.element_size() + scales) / (1024 * 4096)


def nf4_rows(model: torch.nn.Module, name: str, budget: float | str, per_weight: float) -> list[dict]:
    """One GPU: the static memory of NeFT and LoRA over a bf16 and over an NF4 frozen base."""
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and "lm_head" not in n
    )
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for strategy, counts in strategy_counts(model, budget).items():
        if counts["frozen"] == 0:
            continue  # full fine-tuning trains every weight: nothing to quantize
        state = counts["trainable"] * (MASTER + GRAD + ADAM)
        base_slice = counts["trainable"] * FROZEN if strategy.startswith("NeFT") else 0
        bf16 = total * FROZEN + state
        nf4 = linear * per_weight + (total - linear) * FROZEN + state + base_slice
        rows.append({"model": name, "strategy": strategy, "bf16_base_gib": round(bf16 / GIB, 1),
                     "nf4_base_gib": round(nf4 / GIB, 1)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument(
        "--budget", default="0.09", help="NeFT's budget: a share (0.09) or a paper point (paper_9)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed_memory.json"))
    parser.add_argument(
        "--nf4", action="store_true", help="also one GPU with an NF4 frozen base (needs bitsandbytes)"
    )
    args = parser.parse_args()
    budget = args.budget if args.budget.startswith("paper_") else float(args.budget)
    rows, quantized = [], []
    per_weight = nf4_bytes_per_weight() if args.nf4 else None
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
        if per_weight is not None:
            quantized += nf4_rows(model, name, budget, per_weight)
        for strategy, counts in strategy_counts(model, budget).items():
            for gpus in args.gpus:
                for trainer in ("ddp", "fsdp"):
                    gib = per_rank_gib(
                        counts, layer_params, shape["num_hidden_layers"], gpus, trainer == "fsdp"
                    )
                    rows.append({"model": name, "strategy": strategy, "trainer": trainer, "gpus": gpus,
                                 "trainable": counts["trainable"], "gib_per_rank": round(gib, 1)})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"budget": args.budget, "rows": rows}
    if per_weight is not None:
        result |= {"nf4_bytes_per_weight": round(per_weight, 4), "nf4_rows": quantized}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| model | strategy | trainable | {' | '.join(f'DDP ×{g} / FSDP2 ×{g}' for g in args.gpus)} |")
    print("|---|---|---:|" + "---:|" * len(args.gpus))
    keys = sorted({(r["model"], r["strategy"], r["trainable"]) for r in rows}, key=lambda k: (k[0], -k[2]))
    for model_name, strategy, trainable in keys:
        cells = []
        for gpus in args.gpus:
            ddp, fsdp = (next(r["gib_per_rank"] for r in rows if (r["model"], r["strategy"], r["gpus"], r["trainer"])
                              == (model_name, strategy, gpus, t)) for t in ("ddp", "fsdp"))  # fmt: skip
            cells.append(f"{ddp:,.1f} / {fsdp:,.1f}")
        print(f"| {model_name} | {strategy} | {trainable / 1e6:,.0f}M | {' | '.join(cells)} |")
    print(f"GiB per rank, static (weights, float32 masters, gradients, AdamW); written to {args.out}")
    if quantized:
        print(f"\nOne GPU, frozen base in bf16 vs NF4 ({per_weight:.3f} B per quantized weight), GiB:\n")
        print("| model | strategy | bf16 base | NF4 base |\n|---|---|---:|---:|")
        for row in quantized:
            print(
                f"| {row['model']} | {row['strategy']} | {row['bf16_base_gib']:,.1f} | {row['nf4_base_gib']:,.1f} |"
            )


if __name__ == "__main__":
    main()
