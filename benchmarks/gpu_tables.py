"""Markdown tables for the README and docs from the GPU suite's JSON (`benchmarks/gpu_suite.py`).

    python benchmarks/gpu_tables.py benchmarks/results/gpu_suite-cuda.json > /tmp/tables.md
    python benchmarks/gpu_tables.py benchmarks/results/gpu_suite-cpu-trial.json   # the dry run's, labelled so

Sections: the hardware line, the suite's items (status, seconds of their limit), the CUDA tests, the
7B-shape step benchmark with its targets, and the small paper table with its zero-shot row and sample
predictions. A dry run's tables open with a warning line: they are never GPU measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neft_step import table as step_table  # noqa: E402

JOB_LABELS = {
    "full": "Full fine-tuning",
    "neft_3": "NeFT 3%",
    "neft_6": "NeFT 6%",
    "neft_9": "NeFT 9%",
    "random_9": "Random 9%",
    "reverse_9": "Reverse 9%",
}


def num(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def gib(value: Any) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


def hardware(record: dict[str, Any]) -> str:
    driver = f", driver {record['driver']}" if record.get("driver") else ""
    cuda = f" (CUDA {record['cuda']}{driver})" if record.get("cuda") else ""
    versions = ", ".join(f"{k} {record[k]}" for k in ("transformers", "peft", "lightning") if record.get(k))
    return f"{record.get('device_name')}{cuda}, torch {record.get('torch')}, {versions}; {record.get('date_utc')}"


def suite_section(suite: dict[str, Any]) -> list[str]:
    lines = [
        "| item | status | seconds (limit) |",
        "|---|---|---|",
    ]
    for item in suite.get("items", []):
        seconds = f"{item['seconds']:.0f} ({item['limit_s']:.0f})" if "seconds" in item else "–"
        status = item["status"] + (f": {item['reason']}" if item.get("reason") else "")
        lines.append(f"| {item.get('title', item['item'])} | {status} | {seconds} |")
    return lines


def tests_section(result: dict[str, Any]) -> list[str]:
    if "counts" not in result:
        return [f"No test results: {result.get('error', 'none recorded')}"]
    counts = result["counts"]
    lines = [
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped in {result.get('seconds', 0):.0f} s."
    ]
    bad = [t for t in result.get("tests", []) if t["outcome"] in ("failed", "error")]
    lines += [f"- {t['outcome']}: `{t['name']}`: {t.get('message', '')}" for t in bad]
    return lines


def step_section(step: dict[str, Any]) -> list[str]:
    results = step.get("results", {})
    lines = [
        f"{step.get('model')}, {step.get('dtype')}, batch {step.get('batch')}×{step.get('seq')}, budget "
        f"{step.get('budget', 0):.0%}, median of {step.get('steps')} steps after {step.get('warmup')} warm-up, "
        f"{step.get('isolation')} isolation; peak memory = `torch.cuda.max_memory_allocated`"
        if step.get("device", "").startswith("cuda")
        else f"{step.get('model')} (trial shape: layers {step.get('layers')}, width ÷{step.get('width_div')}), "
        f"{step.get('dtype')}, batch {step.get('batch')}×{step.get('seq')}, {step.get('device')}",
        "",
    ]
    lines.append(step_table(results))  # the benchmark's own table (one home: benchmarks/neft_step.py)
    lines += ["", "| target | fused NeFT | limit | met | prototype |", "|---|---:|---:|---|---:|"]
    for t in step.get("targets", []):
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}×"
        lines.append(
            f"| {t['target']} | {ratio} | {t['limit']:.2f}× | {met} | {t.get('prototype_ratio', 0):.2f}× |"
        )
    return lines


SAMPLE_JOBS = ("full", "lora", "neft_9")  # besides the zero-shot model: the rows read by eye
SAMPLE_ROWS = 2


def sample_run(evaluation: dict[str, Any]) -> str | None:
    """The row label of an evaluation whose samples are shown (zero-shot, full, LoRA, NeFT 9%), else None."""
    job, _, seed = str(evaluation.get("job") or "").rpartition("-s")
    if "before" in str(evaluation.get("desc")):
        return "zero-shot"
    if job in SAMPLE_JOBS:
        return f"{JOB_LABELS.get(job, 'LoRA')} (seed {seed})"
    return None


def job_label(job: dict[str, Any]) -> str:
    if job["job"] == "lora":
        return f"LoRA r={job.get('lora_r', '?')}" if job.get("lora_r") else "LoRA (matched rank)"
    return JOB_LABELS.get(job["job"], job["job"])


def table_section(table: dict[str, Any]) -> list[str]:
    settings = table.get("settings", {})
    lines = [
        f"{table.get('model')} on WMT zh→en: train WMT18–20, test WMT21 (first {settings.get('test')} segments), "
        f"{settings.get('steps')} steps, batch {settings.get('batch')}, lr {settings.get('lr')} (LoRA "
        f"{settings.get('lora_lr')}), seeds {settings.get('seeds')}; generation in "
        f"{', '.join(sorted({e.get('generation_dtype', '?') for e in table.get('evaluations', [])})) or '?'} "
        f"on {table.get('device')}; model read from disk {table.get('model_loads_from_disk', '?')}×, "
        f"copied to {table.get('model_copies_served', '?')} runs."
        + (
            ""
            if table.get("device") == "cuda"
            else " CPU peak memory is the process's ru_maxrss: it only grows from job to job."
        ),
        "",
        "| method | seed | trainable % | BLEU | chrF | test loss | train s | step s | peak GiB | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    zero = (table.get("zero_shot") or {}).get("metrics")
    if zero:
        lines.append(
            f"| Zero-shot (base model) | – | 0 | {num(zero.get('bleu'))} | {num(zero.get('chrf'))} "
            f"| {num(zero.get('loss'), 3)} | – | – | – | ok |"
        )
    for job in table.get("jobs", []):
        status = job["status"] + (
            f": {job.get('reason') or job.get('error')}" if job["status"] != "ok" else ""
        )
        lines.append(
            f"| {job_label(job)} | {job['seed']} | {num(job.get('trainable_percent'))} | {num(job.get('bleu'))} "
            f"| {num(job.get('chrf'))} | {num(job.get('test_loss'), 3)} | {num(job.get('train_seconds'), 0)} "
            f"| {num(job.get('step_seconds_median'), 3)} | {gib(job.get('peak_memory_bytes'))} | {status} |"
        )
    samples = [e for e in table.get("evaluations", []) if e.get("samples") and sample_run(e)]
    if samples:
        lines += ["", "Sample predictions (the first test segments, to be read by eye):", ""]
        lines += ["| run | source | reference | prediction |", "|---|---|---|---|"]
        for evaluation in samples:
            for row in evaluation["samples"][:SAMPLE_ROWS]:
                cells = [
                    str(row.get(k, ""))[:160].replace("|", "\\|").replace("\n", " ")
                    for k in ("source", "reference", "prediction")
                ]
                lines.append(f"| {sample_run(evaluation)} | {' | '.join(cells)} |")
    return lines


def render(suite: dict[str, Any]) -> str:
    items = {i["item"]: i for i in suite.get("items", [])}
    out = []
    if suite.get("trial"):  # a dry run says so before anything else
        out += [f"> **{suite.get('note') or 'A dry run, not a GPU measurement'}.**", ""]
    out += [f"Hardware: {hardware(suite)}", "", "### Suite", ""] + suite_section(suite)
    cuda = suite.get("device") == "cuda"
    sections = (
        (
            "tests",
            "CUDA tests (`-m gpu`)" if cuda else "Device tests, CPU variants (`-m 'not gpu'`)",
            tests_section,
        ),
        ("step", "One training step, Llama-2-7B shape", step_section),
        ("table", "Small paper table", table_section),
    )
    for key, title, render_section in sections:
        result = items.get(key, {}).get("result")
        if result:
            out += ["", f"### {title}", ""] + render_section(result)
    out += ["", f"Command: `{suite.get('command')}`"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suite_json", help="benchmarks/results/gpu_suite-<cuda|cpu-trial>.json")
    parser.add_argument("--out", default=None, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    text = render(json.loads(Path(args.suite_json).read_text()))
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
