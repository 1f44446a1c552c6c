"""How long scoring every neuron vector of a base/reference pair takes, read straight from disk.

    python benchmarks/scoring.py --model gemma3_270m     # the real Gemma-3-270M (73,728 up/down vectors)
    python benchmarks/scoring.py --model tiny

The reference is the base with seeded noise added to its MLP weights (timing does not depend on
how the reference was trained), written once to a scratch folder. Compared with the authors'
per-vector loop (one cosine call per vector), timed on a sample and extrapolated.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neft_lab.config import compose
from neft_lab.io import atomic_write_json
from neft_lab.models.loading import load_model
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.scoring import WeightSource, cosine_scores


def per_vector_loop(base: np.ndarray, ref: np.ndarray, axis: int, sample: int) -> float:
    """Seconds per vector of a plain NumPy loop, one cosine per vector."""
    started = time.perf_counter()
    for i in range(sample):
        a = base[i] if axis == 0 else base[:, i]
        b = ref[i] if axis == 0 else ref[:, i]
        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return (time.perf_counter() - started) / sample


def sklearn_loop(base: np.ndarray, ref: np.ndarray, axis: int, sample: int) -> float | None:
    """Seconds per vector of the authors' loop: sklearn's cosine_similarity on one vector pair at a time."""
    try:
        from sklearn.metrics.pairwise import cosine_similarity
    except ImportError:
        return None
    started = time.perf_counter()
    for i in range(sample):
        a = base[i] if axis == 0 else base[:, i]
        b = ref[i] if axis == 0 else ref[:, i]
        cosine_similarity(a[None], b[None])
    return (time.perf_counter() - started) / sample


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sample", type=int, default=2000, help="vectors timed for the per-vector loop")
    parser.add_argument(
        "--scratch", default=None, help="folder for the base/reference copies (default: a temp dir)"
    )
    args = parser.parse_args()

    cfg = compose([f"model={args.model}", "paths.run_dir=/tmp/unused"])
    model, _ = load_model(cfg.model)
    space = NeuronSpace.from_model(model)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="neft_scoring_"))
    base_dir, ref_dir = scratch / "base", scratch / "reference"
    if not (ref_dir / "config.json").exists():
        model.save_pretrained(base_dir)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for group in space.groups:
                weight = model.get_parameter(group.weight)
                weight.add_(1e-3 * torch.randn(weight.shape, generator=generator))
        model.save_pretrained(ref_dir)
    del model

    started = time.perf_counter()
    scores = cosine_scores(WeightSource(base_dir), WeightSource(ref_dir), space)
    ours = time.perf_counter() - started
    assert sum(s.numel() for s in scores.values()) == space.num_vectors

    first = space.groups[0]
    base_w = WeightSource(base_dir).get(first.weight).numpy()
    ref_w = WeightSource(ref_dir).get(first.weight).numpy()
    per_vector = per_vector_loop(base_w, ref_w, first.axis, min(args.sample, first.count))
    sklearn_per_vector = sklearn_loop(base_w, ref_w, first.axis, min(args.sample, first.count))
    record = {
        "model": args.model,
        "vectors": space.num_vectors,
        "matrices": len(space.groups),
        "vectorised_from_disk_s": ours,
        "per_vector_loop_s_per_vector": per_vector,
        "per_vector_loop_extrapolated_s": per_vector * space.num_vectors,
        "sklearn_loop_s_per_vector": sklearn_per_vector,
        "sklearn_loop_extrapolated_s": sklearn_per_vector and sklearn_per_vector * space.num_vectors,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    out = Path(__file__).parent / "results" / f"scoring-{args.model}-cpu.json"
    atomic_write_json(out, record)
    print(f"{args.model}: {space.num_vectors:,} vectors in {len(space.groups)} matrices")
    print(f"  vectorised, one matrix at a time from safetensors: {ours:.2f} s")
    print(
        f"  per-vector loop: {1e6 * per_vector:.0f} µs/vector → {per_vector * space.num_vectors:.1f} s extrapolated"
    )
    if sklearn_per_vector:
        print(
            f"  sklearn cosine_similarity per vector (the authors' loop): {1e6 * sklearn_per_vector:.0f} µs/vector → "
            f"{sklearn_per_vector * space.num_vectors:.1f} s extrapolated"
        )
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
