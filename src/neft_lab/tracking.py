"""What a run reports beyond Lightning's own logging: run statistics for `metrics.json`, and for the
experiment loggers the resolved config, parameter counts, throughput, peak memory, the neuron set
and sample predictions.

Run-level scalars live under `train/` (`train/trainable_parameters`, `train/step_seconds_median`,
`train/peak_memory_gib`, ...): W&B's closing console summary lists only the first 10 keys in
alphabetical order, and keys sorting before `test/` would push the test metrics out of it.
Every logger receives the scalars; W&B (found among `trainer.loggers`) also gets the config, the
neuron-set table, bar chart and cosine histograms, and a table of predictions. The CSV logger gets
scalars only. Nothing here fails a run for want of a logger.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

PREDICTION_COLUMNS = ("source", "reference", "prediction")


class RunStats(L.Callback):
    """Per training batch: seconds (the same span as `train/step_seconds`) and tokens; peak memory."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.tokens_per_second: list[float] = []
        self._started = 0.0
        self._tokens = 0
        self._cuda: torch.device | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        self._cuda = device if device.type == "cuda" else None
        if self._cuda is not None:  # the peak of this run's training, weights included
            torch.cuda.reset_peak_memory_stats(self._cuda)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self._tokens = int(mask.sum()) if mask is not None else 0
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        seconds = time.perf_counter() - self._started
        self.step_seconds.append(seconds)
        self.tokens_per_second.append(self._tokens / max(seconds, 1e-9))

    def summary(self) -> dict[str, Any]:
        """Median step time and throughput (robust to the first, slow step) and peak memory."""
        out: dict[str, Any] = {
            "step_seconds_median": _median(self.step_seconds),
            "tokens_per_second_median": _median(self.tokens_per_second),
        }
        out.update(peak_memory(self._cuda))
        return out


def peak_memory(cuda_device: torch.device | None = None) -> dict[str, Any]:
    """`torch.cuda.max_memory_allocated` on GPU; otherwise the process's peak RSS (`ru_maxrss`)."""
    if cuda_device is not None and torch.cuda.is_available():
        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(cuda_device)),
            "peak_memory_source": "cuda_max_memory_allocated",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_memory_bytes": int(rss) * scale, "peak_memory_source": "ru_maxrss"}


def attach_run_stats(trainer: L.Trainer) -> RunStats:
    stats = RunStats()
    trainer.callbacks.insert(0, stats)
    return stats


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


@rank_zero_only
def log_scalars(trainer: L.Trainer, values: dict[str, Any], step: int | None = None) -> None:
    """Numbers only (None and bools dropped), to every logger."""
    scalars = {
        k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if scalars:
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=trainer.global_step if step is None else step)


@rank_zero_only
def log_run_start(
    trainer: L.Trainer, cfg: DictConfig, summary: dict[str, Any], neuron_set: Any = None
) -> None:
    """Before training: the resolved config (W&B), parameter counts (all loggers), the neuron set (W&B)."""
    for lg in wandb_loggers(trainer):
        lg.log_hyperparams(run_config(cfg))
    log_scalars(
        trainer,
        {
            "train/trainable_parameters": summary.get("trainable_parameters"),
            "train/total_parameters": summary.get("total_parameters"),
            "train/trainable_percent": summary.get("trainable_percent"),
            "neurons/vectors": summary.get("neuron_vectors"),
            "neurons/parameters": summary.get("neuron_parameters"),
            "neurons/share_of_mlp_vectors": summary.get("share_of_mlp_vectors"),
        },
        step=0,
    )
    if neuron_set is not None:
        log_neuron_set(trainer, neuron_set)


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The whole resolved config as plain containers (+ the command-line overrides inside a Hydra job)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        config["overrides"] = list(hydra_cfg.overrides.task)
        config["job_num"] = hydra_cfg.job.get("num")
    except ValueError:  # not inside a Hydra job
        pass
    return config


def neuron_set_rows(neuron_set: Any) -> list[list[Any]]:
    """One row per weight matrix: group, kind, layer, selected vectors, all vectors."""
    rows = []
    for group in neuron_set.space.groups:
        idx = neuron_set.indices.get(group.name)
        rows.append(
            [group.name, group.kind, group.layer, 0 if idx is None else int(idx.numel()), group.count]
        )
    return rows


@rank_zero_only
def log_neuron_set(trainer: L.Trainer, neuron_set: Any) -> None:
    """W&B: per-layer counts (table + bar chart) and histograms of the cosine scores, all and selected."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    table = wandb.Table(
        columns=["group", "kind", "layer", "selected", "vectors"], data=neuron_set_rows(neuron_set)
    )
    logged: dict[str, Any] = {
        "neurons/per_layer": table,
        "neurons/per_layer_chart": wandb.plot.bar(
            table, "group", "selected", title="selected vectors per matrix"
        ),
    }
    if neuron_set.scores:
        masks = neuron_set.masks()
        scores = {n: s.float().flatten() for n, s in neuron_set.scores.items()}
        every = torch.cat(list(scores.values()))
        chosen = torch.cat([s[masks[n]] for n, s in scores.items() if n in masks])
        logged["neurons/cosine_all"] = wandb.Histogram(every.numpy())
        if chosen.numel():
            logged["neurons/cosine_selected"] = wandb.Histogram(chosen.numpy())
    for lg in loggers:
        lg.log_metrics(logged, step=0)


@rank_zero_only
def log_run_end(trainer: L.Trainer, train: dict[str, Any]) -> None:
    """After training: median step time, throughput and peak memory, to every logger."""
    peak = train.get("peak_memory_bytes")
    log_scalars(
        trainer,
        {
            "train/step_seconds_median": train.get("step_seconds_median"),
            "train/tokens_per_second_median": train.get("tokens_per_second_median"),
            "train/peak_memory_gib": None if peak is None else peak / 2**30,
            "train/seconds": train.get("seconds"),
        },
    )


@rank_zero_only
def log_predictions(trainer: L.Trainer, rows: list[dict[str, str]], n: int) -> None:
    """W&B: the first `n` test predictions as a table (source, reference, prediction)."""
    if n <= 0 or not rows:
        return
    data = [[row.get(c, "") for c in PREDICTION_COLUMNS] for row in rows[:n]]
    for lg in wandb_loggers(trainer):
        lg.log_table(
            "test/predictions", columns=list(PREDICTION_COLUMNS), data=data, step=trainer.global_step
        )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
