"""How the neuron scorers compare: the cost of scoring and what the chosen set trains to.

For each scorer (cosine = the paper's, gradient, lora_reference, activation_probe) this runs, each in its own process
as a user would type it, on one fresh cache:

    python -m neft_lab stage=score  selection=<scorer> ...      # wall time and peak RSS measured (reference run included)
    python -m neft_lab stage=select selection=<scorer> selection.scores=<file> selection.out=<set> ...
    python -m neft_lab strategy=neft selection=from_file selection.file=<set> ...   # the same short NeFT training

plus `strategy=random_neuron` at the same budget, and reports the IoU of each set with the cosine set,
the scoring stage's wall time and peak memory (max RSS of its process: for cosine and lora_reference
that includes their reference fine-tune, which is the point), and BLEU / chrF after training.

    python benchmarks/compare_scorers.py --data ../shared/data            # Gemma-3-270M, WMT zh→en, CPU (~1 h)
    python benchmarks/compare_scorers.py --model tiny --steps 4 --fit-steps 4   # a trial of the plumbing (minutes)

Rerun with the same --work to resume: finished scoring stages are taken from their logs and caches.

Writes benchmarks/results/compare_scorers-<model>-<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# activation_probe: our MLP-activation ridge probe (formerly `probe`), which needs no labelled file; the paper's
# probe (selection=probe) needs the user's classification data and is not part of this comparison
SCORERS = ("cosine", "gradient", "lora_reference", "activation_probe")
REPO = Path(__file__).resolve().parents[1]


def common_overrides(args: argparse.Namespace) -> list[str]:
    fit_steps = args.fit_steps or args.steps
    out = [
        f"model={args.model}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"trainer.max_steps={fit_steps}",
        f"trainer.val_check_interval={fit_steps}",
        f"selection.reference.steps={args.steps}",
        f"loader.batch_size={args.batch}",
        f"optim.lr={args.lr}",
        "optim.scheduler=constant",
        f"budget={args.budget}",
        f"threads={args.threads}",
        f"selection.gradient.batches={args.gradient_batches}",
        f"selection.activation_ridge.max_examples={args.probe_examples}",
    ]
    if args.model == "tiny":
        return [*out, "experiment=smoke", "task.data.embedded.n_test=16"]
    data = Path(args.data).resolve()
    return [
        *out,
        "task=wmt_zh_en",
        f"task.data.train_dir={data / 'wmt18-20_zh_en_train'}",
        f"task.data.test_dir={data / 'wmt21_zh_en'}",
        f"task.data.max_test={args.test}",
        "task.data.max_val=16",
        "task.truncate_source=true",
        f"task.max_new_tokens={args.max_new_tokens}",
    ]


def neft_lab(overrides: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run `python -m neft_lab` and return (wall seconds, peak RSS GiB) of its process tree's largest process."""
    stats = log.with_suffix(".time")
    command = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), sys.executable, "-m", "neft_lab", *overrides]
    with open(log, "w") as handle:
        done = subprocess.run(
            command,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if done.returncode != 0:
        raise SystemExit(
            f"failed ({done.returncode}): python -m neft_lab {' '.join(overrides)}\n  log: {log}"
        )
    seconds, kib = stats.read_text().split()[-2:]
    return float(seconds), int(kib) / 2**20


def iou(a: Path, b: Path) -> float:
    from neft_lab.neurons.neuron_set import NeuronSet

    first, second = NeuronSet.load(a), NeuronSet.load(b)
    both = first.intersection(second).num_vectors
    return both / max(first.num_vectors + second.num_vectors - both, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--steps", type=int, default=30, help="reference training steps (cosine, lora_reference)"
    )
    parser.add_argument(
        "--fit-steps", type=int, default=12, help="NeFT training steps on each set (0: --steps)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--budget", default="0.09")
    parser.add_argument("--test", type=int, default=40, help="test segments")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gradient-batches", type=int, default=8)
    parser.add_argument("--probe-examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scorers", default=",".join(SCORERS))
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="compare_scorers-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [*common_overrides(args), f"paths.cache_dir={work / 'cache'}"]
    rows: dict[str, dict] = {}
    started = time.time()
    for scorer in [s for s in args.scorers.split(",") if s]:
        print(f"[{time.time() - started:6.0f} s] {scorer}: score", flush=True)
        stats = work / f"{scorer}-score.time"
        if (
            stats.exists()
        ):  # a rerun with the same --work: this scoring stage finished before (its scores are cached)
            seconds, kib = stats.read_text().split()[-2:]
            seconds, gib = float(seconds), int(kib) / 2**20
        else:
            seconds, gib = neft_lab(
                [*common, "stage=score", f"selection={scorer}"], work, work / f"{scorer}-score.log"
            )
        scores = next(p for p in (work / "cache").rglob("scores.safetensors") if _scorer_of(p) == scorer)
        neuron_set = work / "sets" / scorer
        neft_lab([*common, "stage=select", f"selection={scorer}", f"selection.scores={scores}", f"selection.out={neuron_set}"],
                 work, work / f"{scorer}-select.log")  # fmt: skip
        print(f"[{time.time() - started:6.0f} s] {scorer}: NeFT training", flush=True)
        run_dir = work / "runs" / scorer
        neft_lab([*common, "strategy=neft", "selection=from_file", f"selection.file={neuron_set}.safetensors",
                  f"paths.run_dir={run_dir}", "resume=false"], work, work / f"{scorer}-fit.log")  # fmt: skip
        rows[scorer] = {
            "score_seconds": seconds,
            "score_peak_rss_gib": gib,
            "set": f"{neuron_set}.safetensors",
            "run": str(run_dir),
        }
    print(f"[{time.time() - started:6.0f} s] random: NeFT training", flush=True)
    run_dir = work / "runs" / "random"
    neft_lab([*common, "strategy=random_neuron", f"paths.run_dir={run_dir}", "resume=false", "eval.before=true"],
             work, work / "random-fit.log")  # fmt: skip
    rows["random"] = {
        "score_seconds": 0.0,
        "score_peak_rss_gib": None,
        "set": str(run_dir / "neuron_set.safetensors"),
        "run": str(run_dir),
    }
    cosine_set = rows.get("cosine", {}).get("set")
    zero_shot: dict = {}
    for row in rows.values():
        metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
        row.update(
            iou_with_cosine=iou(Path(row["set"]), Path(cosine_set)) if cosine_set else None,
            bleu=metrics["after"].get("bleu"),
            chrf=metrics["after"].get("chrf"),
            test_loss=metrics["after"].get("loss"),
            train_seconds=metrics["train"]["seconds"],
            neuron_vectors=metrics.get("neuron_vectors"),
        )
        if "before" in metrics:
            zero_shot = {k: metrics["before"].get(k) for k in ("bleu", "chrf", "loss")}
    if zero_shot:
        rows["_zero_shot"] = zero_shot
    import torch

    result = {
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work",)},
        "overrides": common[:-1],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "total_seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    out = REPO / "benchmarks" / "results" / f"compare_scorers-{args.model}-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(to_markdown(result))
    print(f"→ {out}")


def _scorer_of(path: Path) -> str:
    from neft_lab.neurons import scores_file

    return scores_file.load(path)[1]["scorer"]


def to_markdown(result: dict) -> str:
    lines = [
        "| scorer | IoU with cosine | scoring wall s | scoring peak RSS GiB | test BLEU | test chrF | test loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        if name.startswith("_"):
            continue
        rss = "–" if row["score_peak_rss_gib"] is None else f"{row['score_peak_rss_gib']:.2f}"
        iou_cell = "–" if row["iou_with_cosine"] is None else f"{row['iou_with_cosine']:.3f}"
        lines.append(
            f"| {name} | {iou_cell} | {row['score_seconds']:.0f} | {rss} | {row['bleu']:.2f} | {row['chrf']:.2f} | {row['test_loss']:.3f} |"
        )
    zero = result["rows"].get("_zero_shot")
    if zero:
        lines.append(
            f"| (zero-shot base) | – | – | – | {zero['bleu']:.2f} | {zero['chrf']:.2f} | {zero['loss']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
