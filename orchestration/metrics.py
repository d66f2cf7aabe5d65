"""Metrics written by rank 0 into the run directory (a Location: local or s3://):
metrics.parquet and curves.png, and the summary.json figures.

metrics.parquet has one row per logged step (top1/top5 null) and one per epoch (top1/top5
set, loss = the epoch's mean train loss, images_per_s/data_wait over the epoch), each with
the world size that took it (an elastic run's resizes show). On resume the rows of epochs
after the checkpoint are dropped, so a resumed run leaves one row per epoch.
"""
from __future__ import annotations

import io
import math
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shards.location import Location, corrupt_file

COLUMNS = ("epoch", "step", "loss", "lr", "images_per_s", "data_wait", "top1", "top5", "skipped_samples",
           "world_size", "images_per_s_per_worker", "dali_cpu_util", "mem_anon_mb", "mem_file_mb",
           "dali_device_mb", "nvjpg_util")
SCHEMA = pa.schema([("epoch", pa.int64()), ("step", pa.int64())]
                   + [(c, pa.float64()) for c in COLUMNS[2:8]]
                   + [("skipped_samples", pa.int64()), ("world_size", pa.int64())]
                   + [(c, pa.float64()) for c in COLUMNS[10:]])
# Step rows also say where the loader's time and memory go (pipeline.usage), each the mean over
# ranks: dali_cpu_util (DALI pool CPU time / (wall x dali_threads)), mem_anon_mb and mem_file_mb (host
# resident memory, anonymous and file-backed: DALI's mapped tars are file-backed and come and go with
# each pass, so a leak shows in mem_anon_mb only), dali_device_mb (device memory outside torch's
# allocator; null on CPU), nvjpg_util (the share of time the GPU's hardware JPEG decoder was busy,
# NVML; null on CPU); images_per_s_per_worker is on every row.


def read_metrics(loc: Location, way_out: str = "delete it") -> pa.Table:
    """metrics.parquet at `loc` (a local file or an object); CorruptFile naming it and
    `way_out` when it does not parse."""
    try:
        return pq.read_table(pa.BufferReader(loc.read_bytes()))
    except pa.ArrowException as err:
        raise corrupt_file(loc.uri, err, way_out) from None


class MetricsLog:
    """Rows of metrics.parquet, rewritten whole on every flush (one object, complete or absent;
    a few thousand rows at most)."""

    def __init__(self, loc: Location, resume_epoch: int = 0, resume_step: int = 0, world_size: int = 1) -> None:
        """On a resume, the rows of what the checkpoint covers stay: epoch rows up to
        `resume_epoch`, step rows up to `resume_step`. New rows carry `world_size`."""
        self.loc, self.world_size = loc, world_size
        self.rows: list[dict[str, Any]] = []
        if resume_step > 0 and loc.is_file():
            self.rows = [r for r in read_metrics(loc).to_pylist()
                         if (r["epoch"] <= resume_epoch if r["top1"] is not None else r["step"] <= resume_step)]

    def log_step(self, epoch: int, step: int, loss: float, lr: float, images_per_s: float,
                 data_wait: float, dali_cpu_util: float | None = None, mem_anon_mb: float | None = None,
                 mem_file_mb: float | None = None, dali_device_mb: float | None = None,
                 nvjpg_util: float | None = None) -> None:
        self.rows.append(dict(epoch=epoch, step=step, loss=loss, lr=lr, images_per_s=images_per_s,
                              data_wait=data_wait, top1=None, top5=None, skipped_samples=None,
                              world_size=self.world_size, images_per_s_per_worker=images_per_s / self.world_size,
                              dali_cpu_util=dali_cpu_util, mem_anon_mb=mem_anon_mb, mem_file_mb=mem_file_mb,
                              dali_device_mb=dali_device_mb, nvjpg_util=nvjpg_util))

    def log_epoch(self, epoch: int, step: int, loss: float, lr: float, images_per_s: float,
                  data_wait: float, top1: float, top5: float, skipped_samples: int = 0) -> None:
        self.rows.append(dict(epoch=epoch, step=step, loss=loss, lr=lr, images_per_s=images_per_s,
                              data_wait=data_wait, top1=top1, top5=top5, skipped_samples=skipped_samples,
                              world_size=self.world_size, images_per_s_per_worker=images_per_s / self.world_size))
        self.flush()

    def epoch_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["top1"] is not None]

    def flush(self) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), buf)
        self.loc.write_bytes(buf.getvalue().to_pybytes())


def summarize(epoch_rows: list[dict[str, Any]], *, wall_s: float, world_size: int, restarts: int) -> dict[str, Any]:
    """summary.json: the last epoch's val accuracy; throughput averaged over epochs after the
    first (the first carries start-up: DALI pipeline build, first-touch of the shards)."""
    last = epoch_rows[-1]
    steady = epoch_rows[1:] if len(epoch_rows) > 1 else epoch_rows
    return {
        "top1": last["top1"],
        "top5": last["top5"],
        "images_per_s": sum(r["images_per_s"] for r in steady) / len(steady),
        "data_wait": sum(r["data_wait"] for r in steady) / len(steady),
        "wall_s": wall_s,
        "world_size": world_size,
        "epochs": last["epoch"],
        "restarts": restarts,
    }


def plot_curves(epoch_rows: list[dict[str, Any]], loc: Location, title: str = "",
                resizes: list[tuple[float, int, int]] = ()) -> None:
    """curves.png: train loss, val top-1/top-5, and data-wait share, by epoch; a dashed line
    at each resize (epochs of training done, world size before, after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in epoch_rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["loss"] for r in epoch_rows], marker="o")
    axes[0].set(title="train loss", xlabel="epoch")
    axes[1].plot(epochs, [100 * r["top1"] for r in epoch_rows], marker="o", label="top-1")
    axes[1].plot(epochs, [100 * r["top5"] for r in epoch_rows], marker="o", label="top-5")
    axes[1].set(title="val accuracy (%)", xlabel="epoch", ylim=(0, 100))
    axes[1].legend()
    axes[2].plot(epochs, [100 * r["data_wait"] for r in epoch_rows], marker="o")
    axes[2].set(title="data-wait share of step time (%)", xlabel="epoch", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
        for at, before, after in resizes:
            ax.axvline(at, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"{before}\u2192{after}", (at, 1), xycoords=("data", "axes fraction"), fontsize=8,
                        ha="left", va="top", xytext=(2, -2), textcoords="offset points")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    loc.write_bytes(png.getvalue())


def fmt_pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"
