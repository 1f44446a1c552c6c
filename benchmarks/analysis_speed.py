"""How long the utilization analysis (stage=analyze) of one model takes: every up/down vector of
Gemma-3-270M (73,728) over 200 WMT21 zh→en test sentences (prompt + reference) on this CPU.

    python benchmarks/analysis_speed.py                       # gemma3_270m, 200 sentences, 2 threads
    python benchmarks/analysis_speed.py --model tiny --task embedded --sentences 32

Times the streaming forward passes (hooks keep one running sum per layer) and the scoring of every
vector apart, and estimates what a per-token computation (the correlation of every vector with every
token's hidden state at every preceding layer, then aggregated) would cost, timed on a sample of tokens.
Writes benchmarks/results/analysis_speed-<model>-cpu.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import transformers

from neft_lab.analysis.inputs import pad_id, split_sequences
from neft_lab.analysis.utilization import group_weights, hidden_means, score_vectors, unit_vectors
from neft_lab.config import compose
from neft_lab.data.task import Task
from neft_lab.io import atomic_write_json
from neft_lab.models.loading import load_model
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.tracking import peak_memory

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def per_token_seconds(model: torch.nn.Module, space: NeuronSpace, sample_tokens: int) -> float:
    """Seconds per token of the per-token way: every vector against one token's hidden state at every
    preceding layer (float64, as the streaming sum), on random states of the model's width."""
    d = space.groups[0].length
    states = torch.randn(sample_tokens, space.num_layers, d, dtype=torch.float64)
    vectors = {g.name: unit_vectors(model.get_parameter(g.weight), g) for g in space.groups}
    started = time.perf_counter()
    for group in space.groups:
        corr = torch.einsum("vd,tld->tvl", vectors[group.name], states[:, : group.layer + 1])
        corr.max(dim=-1)
    return (time.perf_counter() - started) / sample_tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--task", default="wmt_zh_en")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sample-tokens", type=int, default=32, help="tokens timed for the per-token estimate"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = [
        f"model={args.model}",
        f"task={args.task}",
        "paths.run_dir=/tmp/unused",
        "task.truncate_source=true",
    ]
    if args.task == "wmt_zh_en":
        overrides += [
            f"task.data.train_dir={SHARED / 'wmt18-20_zh_en_train'}",
            f"task.data.test_dir={SHARED / 'wmt21_zh_en'}",
        ]
    cfg = compose(overrides)
    started = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    load_s = time.perf_counter() - started
    task = Task.from_config(cfg.task)
    sequences = split_sequences(task, tokenizer, "test", args.sentences, "all", cfg.model.chat_template)
    space = NeuronSpace.from_model(model, ("up", "down"))

    started = time.perf_counter()
    stats = hidden_means(model, space, sequences, pad_id(tokenizer), args.batch_size, desc="utilization")
    forward_s = time.perf_counter() - started
    started = time.perf_counter()
    scores, *_ = score_vectors(group_weights(model, space), space, stats.means)
    scoring_s = time.perf_counter() - started
    assert sum(s.numel() for s in scores.values()) == space.num_vectors
    per_token = per_token_seconds(model, space, args.sample_tokens)

    record = {
        "model": args.model,
        "task": args.task,
        "vectors": space.num_vectors,
        "layers": space.num_layers,
        "sentences": stats.sentences,
        "tokens": stats.tokens,
        "batch_size": args.batch_size,
        "load_model_s": round(load_s, 2),
        "forward_passes_s": round(forward_s, 2),
        "scoring_s": round(scoring_s, 3),
        "total_s": round(forward_s + scoring_s, 2),
        "tokens_per_second": round(stats.tokens / forward_s, 1),
        "per_token_correlations_s_per_token": per_token,
        "per_token_correlations_extrapolated_s": round(per_token * stats.tokens, 1),
        **peak_memory(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    out = Path(__file__).parent / "results" / f"analysis_speed-{args.model}-cpu.json"
    atomic_write_json(out, record)
    print(
        f"{args.model}: {space.num_vectors:,} vectors, {stats.sentences} sentences ({stats.tokens:,} tokens): "
        f"forward passes {forward_s:.1f} s ({stats.tokens / forward_s:.0f} tokens/s), scoring {scoring_s:.2f} s; "
        f"per-token correlations would take ~{per_token * stats.tokens:.0f} s more\n  -> {out}"
    )


if __name__ == "__main__":
    main()
