"""The small paper table in one process (issue 12, item 4): Gemma-3-270M, WMT zh→en, every method, one seed.

`scripts/paper_table_small.sh` runs the same table as five `python -m neft_lab -m` sweeps, each process
loading the model again. On a GPU lent for minutes that start-up is most of a short job, so here:

- the GGUF is converted once into the cache (`NEFT_LAB_CACHE`, skipped when a converted folder is there),
  read from disk once, and every job (the NeFT reference fine-tune included) gets a copy of it in memory:
  `neft_lab.models.loading.load_model` is replaced for this process only (the fit stage looks it up per run);
- jobs run one after another through `neft_lab.pipeline.run` (the code `python -m neft_lab` runs) in
  priority order: full (with the zero-shot score of the base model), LoRA at the matched rank, NeFT 9%,
  random 9%, reverse 9%, NeFT 3%, NeFT 6%, then further seeds; a job that would not finish before
  `--deadline-s` is skipped and says so, and the JSON is rewritten after every job, so a kill loses
  only the job in flight;
- evaluation runs on the training device: Lightning's teardown moves the model back to the CPU after
  `fit`, and the fit stage then scores it there (500 test sentences of greedy generation on the CPU
  would take longer than the whole table). `neft_lab.evaluation.evaluate.evaluate` is wrapped to move the model first.
  Generation runs in the model's float32 (`model.dtype=float32`, `eval.precision=32`: outside the training's
  bf16 autocast), which is what Gemma needs: bf16 generation once garbled its output on the H200.

    python benchmarks/gpu_paper_table.py --data .gpu_data --out benchmarks/results/paper_table_gpu.json  # CUDA
    python benchmarks/gpu_paper_table.py --model tiny --trainer cpu --steps 2 --test 4 --data ../shared/data  # CPU trial

The JSON holds the hardware line, every job's metrics (BLEU, chrF, test loss, train seconds, peak memory),
the zero-shot row, sample predictions and `stage=report`'s table; `benchmarks/gpu_tables.py` renders it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("gpu_paper_table")
# (job name, overrides, needs the NeFT reference fine-tune), in the order they run
JOBS: dict[str, tuple[list[str], bool]] = {
    "full": (["strategy=full"], False),
    "lora": (["strategy=lora", "strategy.r=match", "budget=0.09"], False),
    "neft_9": (["strategy=neft", "budget=0.09"], True),
    "random_9": (["strategy=random_neuron", "budget=0.09"], False),
    "reverse_9": (["strategy=reverse_selection", "budget=0.09"], True),
    "neft_3": (["strategy=neft", "budget=0.03"], True),
    "neft_6": (["strategy=neft", "budget=0.06"], True),
}
SAMPLES = 5  # predictions kept per evaluation, to be read by eye


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model option")
    parser.add_argument(
        "--data", default=str(REPO / ".gpu_data"), help="holds wmt18-20_zh_en_train/, wmt21_zh_en/"
    )
    parser.add_argument("--trainer", default="gpu", help="a conf/trainer option: gpu (bf16-mixed) | cpu")
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma separated, from {list(JOBS)}")
    parser.add_argument(
        "--seeds", default="0", help="comma separated; a later seed runs after all jobs of the first"
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps of every job")
    parser.add_argument(
        "--ref-steps", type=int, default=None, help="NeFT reference fine-tune (default: --steps)"
    )
    parser.add_argument(
        "--val-checks", type=int, default=2, help="validations per job (best by val loss kept)"
    )
    parser.add_argument("--test", type=int, default=500, help="WMT21 test segments scored")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=64, help="generation batch")
    parser.add_argument("--lr", type=float, default=2e-5, help="the paper's")
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (256)")
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="start no job that would end after this"
    )
    parser.add_argument("--runs", default=None, help="run folders (default: outputs/paper_table_gpu)")
    parser.add_argument("--out", default=None, help="the JSON (default: benchmarks/results/paper_table-...)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every job")
    args = parser.parse_args(argv)
    bad = [j for j in args.jobs.split(",") if j not in JOBS]
    if bad:
        parser.error(f"unknown jobs {bad}: choose from {list(JOBS)}")
    args.ref_steps = args.ref_steps or args.steps
    return args


def device_of(args: argparse.Namespace) -> str:
    return "cuda" if args.trainer != "cpu" and torch.cuda.is_available() else "cpu"


def environment(device: str) -> dict[str, Any]:
    import lightning
    import peft
    import transformers

    cuda = device == "cuda"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def common_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    """`scripts/paper_table_small.sh`'s settings (the paper's optimizer: docs/fidelity.md), one seed."""
    data = Path(args.data)
    overrides = [
        f"model={args.model}",
        f"trainer={args.trainer}",
        "logger=csv",
        f"seed={seed}",
        "task=wmt_zh_en",
        f"task.data.train_dir={data / 'wmt18-20_zh_en_train'}",
        f"task.data.test_dir={data / 'wmt21_zh_en'}",
        f"task.data.max_test={args.test}",
        "task.truncate_source=true",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={max(1, args.steps // max(1, args.val_checks))}",
        f"loader.batch_size={args.batch}",
        f"eval.batch_size={args.eval_batch}",
        "eval.precision=32",  # generation in the model's float32, not under the training's bf16 autocast
        f"++selection.reference.steps={args.ref_steps}",
        f"++selection.reference.lr={args.lr}",
        f"++selection.reference.batch_size={args.batch}",
        "experiment_name=paper_small_gpu",
        "resume=false",
        "trainer.enable_progress_bar=false",
        # minutes, not days: no resume checkpoints; the best-by-val-loss one without optimizer state
        "~callbacks.last_checkpoint",
        "callbacks.model_checkpoint.save_weights_only=true",
    ]
    if args.max_new_tokens:
        overrides.append(f"task.max_new_tokens={args.max_new_tokens}")
    if args.trainer == "cpu":
        overrides.append("threads=1")
    return overrides + list(args.extra)


def job_overrides(args: argparse.Namespace, name: str, seed: int, first: bool) -> list[str]:
    specific, _ = JOBS[name]
    lr = args.lora_lr if name == "lora" else args.lr
    out = [
        *common_overrides(args, seed),
        *specific,
        f"optim.lr={lr}",
        f"paths.run_dir={runs_dir(args) / f'{name}-s{seed}'}",
    ]
    if first:
        out.append("eval.before=true")  # the zero-shot row: the base model scored before this job trains
    return out


def runs_dir(args: argparse.Namespace) -> Path:
    return Path(args.runs) if args.runs else REPO / "outputs" / "paper_table_gpu"


def model_key(model_cfg: Any) -> str:
    """A model config, resolved: the NeFT reference run gets its config resolved, the jobs do not."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    return json.dumps(model_cfg, sort_keys=True, default=str)


class Session:
    """One model read from disk, handed out as copies; evaluations moved to `device` and recorded."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_key: str | None = None
        self.copies = 0
        self.disk_loads = 0
        self.job: str | None = None  # the job being run, to label its evaluations
        self.evaluations: list[dict[str, Any]] = []
        self.timing: dict[str, float] = {}

    def prepare(self) -> None:
        """Convert the GGUF once (a no-op when the cache has it), then read the model once."""
        from neft_lab.config import compose
        from neft_lab.models.loading import load_model, model_folder

        cfg = compose(common_overrides(self.args, 0) + ["paths.run_dir=/tmp/unused"])
        started = time.perf_counter()
        folder = model_folder(cfg.model)  # Gemma: converts into the cache the first time
        self.timing["convert_s"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        self.model, self.tokenizer = load_model(cfg.model)
        self.disk_loads += 1
        self.timing["load_s"] = round(time.perf_counter() - started, 2)
        self.model_key = model_key(cfg.model)
        self.timing["model_folder"] = folder  # type: ignore[assignment]
        LOG.info("model %s ready: %s", cfg.model.name, self.timing)

    def install(self) -> None:
        """Point the fit stage at the in-memory model and the on-device evaluation, for this process: it imports
        `load_model` and calls `evaluation.evaluate.evaluate` at run time (neft_lab.stages.fit / .eval)."""
        from neft_lab.evaluation import evaluate as evaluation
        from neft_lab.models import loading

        original_load, original_evaluate = loading.load_model, evaluation.evaluate

        def load_model(model_cfg: Any) -> tuple[Any, Any]:
            if model_key(model_cfg) != self.model_key:  # another model: read it as usual
                self.disk_loads += 1
                return original_load(model_cfg)
            self.copies += 1
            return copy.deepcopy(self.model), self.tokenizer

        def evaluate(model: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], list[dict]]:
            model.to(self.device)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            started = time.perf_counter()
            metrics, rows = original_evaluate(model, *args, **kwargs)
            self.evaluations.append(
                {
                    "job": self.job,
                    "desc": kwargs.get("desc"),
                    "device": self.device,
                    "generation_dtype": dtype,
                    "seconds": round(time.perf_counter() - started, 2),
                    "metrics": metrics,
                    "samples": rows[:SAMPLES],
                }
            )
            return metrics, rows

        loading.load_model = load_model
        evaluation.evaluate = evaluate


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_job(session: Session, overrides: list[str]) -> dict[str, Any]:
    """One `python -m neft_lab` run in this process; its metrics.json."""
    from neft_lab.config import compose
    from neft_lab.pipeline import run

    cfg = compose(overrides)
    run(cfg)
    return json.loads((Path(cfg.paths.run_dir) / "metrics.json").read_text())


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the tables need from a run's metrics.json."""
    after, train = metrics.get("after") or {}, metrics.get("train") or {}
    return {
        "strategy": metrics.get("strategy"),
        "lora_r": metrics.get("lora_r"),
        "impl": metrics.get("impl"),
        "selection": metrics.get("selection"),
        "trainable_parameters": metrics.get("trainable_parameters"),
        "trainable_percent": metrics.get("trainable_percent"),
        "bleu": after.get("bleu"),
        "chrf": after.get("chrf"),
        "test_loss": after.get("loss"),
        "n_test": after.get("n"),
        "eval_seconds": after.get("seconds"),
        "train_steps": train.get("steps"),
        "train_seconds": train.get("seconds"),
        "step_seconds_median": train.get("step_seconds_median"),
        "peak_memory_bytes": train.get("peak_memory_bytes"),
        "best_val_loss": train.get("best_val_loss"),
        "wall_seconds": metrics.get("wall_seconds"),
        "before": metrics.get("before"),
    }


def report_table(args: argparse.Namespace) -> str | None:
    """`stage=report` over the run folders: the paper's Table 2 layout (report/table.md)."""
    from neft_lab.config import compose
    from neft_lab.pipeline import run

    out = runs_dir(args) / "report"
    run(compose(["stage=report", f"report.dir={runs_dir(args)}", f"report.out={out}"]))
    table = out / "table.md"
    return table.read_text() if table.exists() else None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="[paper_table] %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    deadline = started + args.deadline_s if args.deadline_s else None
    device = device_of(args)
    trial = device == "cpu"
    name = f"paper_table-{args.model}-{device}{'-trial' if trial else ''}.json"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
    os.environ.setdefault("WANDB_MODE", "offline")
    from neft_lab.io import atomic_write_json

    record: dict[str, Any] = {
        "what": "the small paper table (issue 12, item 4): WMT zh→en, train WMT18-20, test WMT21",
        **environment(device),
        "trial": trial,
        "note": "CPU dry run with tiny settings: checks the machinery, not a GPU measurement"
        if trial
        else None,
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs")},
        "command": "python benchmarks/gpu_paper_table.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "jobs": [],
    }

    def save() -> None:
        record["elapsed_s"] = round(time.perf_counter() - started, 1)
        record["evaluations"] = session.evaluations
        record["model_timing"] = session.timing
        record["model_copies_served"] = session.copies
        record["model_loads_from_disk"] = session.disk_loads
        atomic_write_json(out, record)

    session = Session(args, device)
    session.prepare()
    session.install()
    save()
    plan = [(job, int(seed)) for seed in args.seeds.split(",") for job in args.jobs.split(",")]
    durations: list[float] = []
    reference_done = False
    for index, (job, seed) in enumerate(plan):
        needs_reference = JOBS[job][1] and not reference_done
        estimate = max(durations, default=0.0) * (2 if needs_reference else 1)
        left = None if deadline is None else deadline - time.perf_counter()
        entry: dict[str, Any] = {"job": job, "seed": seed}
        if left is not None and (left <= 0 or estimate > left):
            entry.update(
                status="skipped",
                reason=f"not enough time left: ~{estimate:.0f} s needed, {max(left, 0):.0f} s left",
            )
            LOG.info("%s seed %d: %s", job, seed, entry["reason"])
            record["jobs"].append(entry)
            save()
            continue
        LOG.info("%s seed %d ... (%.0f s elapsed)", job, seed, time.perf_counter() - started)
        job_started = time.perf_counter()
        session.job = f"{job}-s{seed}"
        try:
            metrics = run_job(session, job_overrides(args, job, seed, first=index == 0))
            entry.update(status="ok", **summarise(metrics))
            reference_done = reference_done or JOBS[job][1]
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the next job still runs
            entry.update(
                status="failed",
                error=f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
            )
        entry["seconds"] = round(time.perf_counter() - job_started, 1)
        durations.append(entry["seconds"])
        LOG.info(
            "%s seed %d: %s in %.0f s %s",
            job,
            seed,
            entry["status"],
            entry["seconds"],
            {k: entry.get(k) for k in ("bleu", "chrf", "test_loss")},
        )
        record["jobs"].append(entry)
        release(device)
        save()
    zero_shot = next((e for e in session.evaluations if "before" in str(e.get("desc"))), None)
    record["zero_shot"] = zero_shot
    try:
        record["report_table_md"] = report_table(args)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the jobs' numbers are in the JSON anyway
        record["report_error"] = f"{type(err).__name__}: {err}"
    save()
    done = sum(1 for e in record["jobs"] if e["status"] == "ok")
    LOG.info("%d of %d jobs done in %.0f s -> %s", done, len(plan), time.perf_counter() - started, out)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
