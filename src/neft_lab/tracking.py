"""What a run reports beyond Lightning's own logging: run statistics for `metrics.json`, and for the
experiment loggers the resolved config, parameter counts, throughput, peak memory, the neuron set
and sample predictions.

Run-level scalars live under `train/` (`train/trainable_parameters`, `train/step_seconds_median`,
`train/peak_memory_gib`, ...): W&B's closing console summary lists only the first 10 keys in
alphabetical order, and keys sorting before `test/` would push the test metrics out of it.
Every logger receives the scalars; W&B (found among `trainer.loggers`) also gets the config, the
neuron-set table, bar chart and cosine histograms, and a table of predictions. The CSV logger gets
scalars only. Nothing here fails a run for want of a logger.

`AppendingCSVLogger` (`logger=csv`) keeps `<run>/csv/metrics.csv` across resumes into the same run folder:
Lightning's CSV logger deletes the file whenever its folder is not empty. (`resume=false`, starting over,
removes it with the earlier run's other results: run_folder.RESULTS.)
"""

from __future__ import annotations

import csv
import io
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from neft_lab.io import atomic_file

PREDICTION_COLUMNS = ("source", "reference", "prediction")


class RunStats(L.Callback):
    """Per training batch: seconds (the same span as `train/step_seconds`) and tokens; peak memory.

    Kept in every checkpoint with the last training loss and the run's wall and training seconds so far, so a
    resumed run reports the steps and the time of the attempts before it too (up to their last checkpoint: the
    steps a kill lost are trained again and counted once), and a run resumed with nothing left to train (killed
    while exporting or evaluating) still reports its final loss, step time and throughput."""

    def __init__(self, started: float | None = None) -> None:
        self.started = (
            time.perf_counter() if started is None else started
        )  # this attempt's start (perf_counter)
        self.train_started: float | None = None
        self.seconds_before = (
            0.0  # wall seconds of earlier attempts, up to the checkpoint this one resumed from
        )
        self.train_seconds_before = 0.0  # their training seconds
        self.step_seconds: list[float] = []
        self.tokens_per_second: list[float] = []
        self.final_loss: float | None = None  # the last step's train/loss, as saved in the checkpoint
        self._trainer: L.Trainer | None = None
        self._started = 0.0
        self._tokens = 0
        self._cuda: torch.device | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self.train_started = time.perf_counter()
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

    def state_dict(self) -> dict[str, Any]:
        loss = self._trainer.callback_metrics.get("train/loss") if self._trainer is not None else None
        if loss is not None:
            self.final_loss = float(loss)
        return {
            "step_seconds": list(self.step_seconds),
            "tokens_per_second": list(self.tokens_per_second),
            "final_loss": self.final_loss,
            "wall_seconds": self.wall_seconds(),
            "train_seconds": self.train_seconds(),
        }

    def wall_seconds(self) -> float:
        """Wall time of the run so far, earlier attempts included."""
        return self.seconds_before + time.perf_counter() - self.started

    def train_seconds(self) -> float:
        """Time in `fit` so far, earlier attempts included."""
        this = 0.0 if self.train_started is None else time.perf_counter() - self.train_started
        return self.train_seconds_before + this

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds_before = float(state_dict.get("wall_seconds", 0.0))
        self.train_seconds_before = float(state_dict.get("train_seconds", 0.0))
        self.step_seconds = [float(v) for v in state_dict.get("step_seconds", [])]
        self.tokens_per_second = [float(v) for v in state_dict.get("tokens_per_second", [])]
        loss = state_dict.get("final_loss")
        self.final_loss = None if loss is None else float(loss)

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


def attach_run_stats(trainer: L.Trainer, started: float | None = None) -> RunStats:
    """`started`: when this attempt began (`time.perf_counter()`), so its wall time counts model loading too."""
    stats = RunStats(started)
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


# ---- the CSV log: append, never truncate ----------------------------------------------------------------
class AppendingCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, but `metrics.csv` is appended to, never emptied.

    Lightning 2.6's writer removes `metrics.csv` as soon as its folder holds anything (every resume or
    rerun into a run folder lost the training log) and rewrites the file in place when a new column
    appears. Here the rows of earlier attempts stay: a resume from step S adds its rows after them. The
    rows a killed attempt logged after its last checkpoint (steps S+1 up to the kill) are kept too, and
    the resumed attempt logs those steps again below them: the file is an append-only record of what
    ran (nothing that was measured is deleted), and the last row of a step is the one the final weights
    descend from. A new column rewrites the file atomically (temporary file, then rename), earlier rows
    getting empty cells. Local folders only (the run folder).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; instead take the columns of the file that is there."""
        self.metrics_keys = _csv_header(Path(self.metrics_file_path))

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        columns = set().union(*self.metrics)
        if not path.is_file() or path.stat().st_size == 0:
            self.metrics_keys = sorted(columns)
            _atomic_write_csv(path, self.metrics_keys, self.metrics)
        elif columns - set(self.metrics_keys):  # a new column: rewrite the whole file with the wider header
            with open(path, newline="", encoding="utf-8") as handle:
                earlier = list(csv.DictReader(handle))
            self.metrics_keys = sorted(columns | set(self.metrics_keys))
            _atomic_write_csv(path, self.metrics_keys, earlier + self.metrics)
        else:
            data = _csv_text(self.metrics_keys, self.metrics, header=False).encode("utf-8")
            with open(path, "ab+") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # the last row was cut short by a kill: start a new line
                    data = b"\r\n" + data
                handle.write(data)
        self.metrics = []


def _csv_header(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def _atomic_write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(_csv_text(columns, rows, header=True).encode("utf-8"))


def _csv_text(columns: list[str], rows: list[dict[str, Any]], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", extrasaction="ignore")  # \r\n, as Lightning
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
