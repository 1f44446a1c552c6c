"""`stage=eval ckpt=<saved result>`: score a saved result (run folder, export folder, NeFT delta or .ckpt,
read by `neft_lab.saved_runs`) on the task's test split, in a run folder of its own. `evaluate_split` and
`print_outcome` are also how `stage=fit` evaluates before and after training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from neft_lab.config_checks import check_common, check_devices, check_saved_result

if TYPE_CHECKING:
    import torch

    from neft_lab.data.datamodule import TaskDataModule
    from neft_lab.data.encoding import PromptEncoder

logger = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    check_common(cfg)
    check_saved_result(cfg, "eval")  # model, strategy (and task unless given) come from the saved run
    check_devices(cfg)  # generation runs on trainer.accelerator


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    from neft_lab.data.datamodule import TaskDataModule
    from neft_lab.data.encoding import PromptEncoder
    from neft_lab.data.task import Task
    from neft_lab.integrity import check_finite_weights
    from neft_lab.io import atomic_write_json, atomic_write_jsonl
    from neft_lab.results import main_metric
    from neft_lab.saved_runs import load_saved_model, with_run_config

    path = Path(cfg.ckpt).expanduser()  # check() made sure it is given and exists
    cfg = with_run_config(cfg, path)
    model, tokenizer = load_saved_model(cfg, path)
    check_finite_weights(model, path)  # NaN/inf weights: refused, not exported or scored as loss null, BLEU 0
    task = Task.from_config(cfg.task)
    encoder = PromptEncoder(tokenizer, task, chat_template=cfg.model.chat_template)
    datamodule = TaskDataModule(task, encoder, eval_batch_size=cfg.loader.eval_batch_size, seed=cfg.seed)
    metrics, rows = evaluate_split(cfg, model, encoder, datamodule, f"{path.name}")
    atomic_write_jsonl(run_dir / "predictions.jsonl", rows)
    atomic_write_json(
        run_dir / "metrics.json",
        {"model": cfg.model.name, "task": task.name, "ckpt": str(path), "after": metrics},
    )
    print_outcome({"after": metrics, "wall_seconds": metrics["seconds"]}, run_dir)
    return main_metric(metrics)


def evaluate_split(
    cfg: DictConfig, model: torch.nn.Module, encoder: PromptEncoder, datamodule: TaskDataModule, label: str
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The task's test split scored with the config's evaluation settings; logs the metrics and a few rows."""
    from neft_lab.evaluation import evaluate

    metrics, rows = evaluate.evaluate(
        model,
        encoder,
        datamodule.examples("test"),
        batch_size=cfg.eval.batch_size,
        comet_model=cfg.eval.comet_model,
        desc=f"test ({label})",
        loss=bool(cfg.eval.get("loss", True)),
        autocast=evaluate.autocast_dtype(cfg.eval.get("precision", "auto"), cfg.trainer.get("precision")),
    )
    logger.info("%s: %s", label, evaluate.format_metrics(metrics))
    for row in rows[: cfg.eval.show]:
        logger.info(
            "  src: %s\n  ref: %s\n  hyp: %s",
            row["source"][:200],
            row["reference"][:200] or ", ".join(row.get("instruction_id_list", ())),  # IFEval: the checks
            row["prediction"][:200],
        )
    return metrics, rows


def print_outcome(results: dict[str, Any], run_dir: Path) -> None:
    """Where the results are and what they say, in a few lines at the end of the run's log."""
    from neft_lab.evaluation.evaluate import format_metrics

    lines = [f"results in {run_dir}/metrics.json"]
    for label in ("before", "after"):
        if label in results:
            lines.append(f"{label:>6}: {format_metrics(results[label])}")
    losses = [results.get(label, {}).get("loss") for label in ("before", "after")]
    if None not in losses:  # learning shows here first: a small model's greedy output may still score 0 BLEU
        change = 100 * (losses[1] - losses[0]) / losses[0]
        lines.append(f"test loss {losses[0]:.2f} → {losses[1]:.2f} ({change:+.0f}%)")
    lines.append(f"wall time {results['wall_seconds']:.0f} s")
    logger.info("\n".join(lines))
