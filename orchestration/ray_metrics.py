"""Training metrics on Ray's Prometheus endpoint, from inside every worker (`ray.util.metrics`).

Each node's Ray exports them at its metrics port (`ray start --metrics-export-port`; `make
cluster-up` fixes it) with Ray's `ray_` prefix, tagged by `rank` and `node`:

| name as Prometheus shows it | kind | what |
|---|---|---|
| `ray_alexnet_train_images_per_s` | gauge | this rank's training images/s over the last logged window |
| `ray_alexnet_train_data_wait` | gauge | share of the window's step time blocked waiting for the next batch |
| `ray_alexnet_train_step_s` | gauge | mean step time of the window |
| `ray_alexnet_loader_images_per_s` | gauge | images delivered per second waited for (an upper bound) |
| `ray_alexnet_loader_dali_cpu_util` | gauge | DALI pool threads' CPU time / (wall time x `dali_threads`) |
| `ray_alexnet_loader_mem_anon_mb` | gauge | anonymous resident memory of the worker, MB (a leak grows it) |
| `ray_alexnet_loader_mem_file_mb` | gauge | file-backed resident memory, MB (mapped tars: up in a pass, down after) |
| `ray_alexnet_loader_device_mb` | gauge | device memory outside torch's allocator (DALI's pools), MB |
| `ray_alexnet_loader_nvjpg_util` | gauge | share of time the GPU's hardware JPEG decoder was busy (NVML; GPU workers) |
| `ray_alexnet_train_samples_total` | counter | samples this rank trained |
| `ray_alexnet_val_top1`, `ray_alexnet_val_top5` | gauge | the last epoch's exact val accuracy (fractions) |

The Grafana dashboard `orchestration/cluster/grafana-dashboard.json` plots them.
"""
from __future__ import annotations

import socket

TAGS = ("rank", "node")


class TrainMetrics:
    """The gauges and the counter of one worker (created once per worker process)."""

    def __init__(self, rank: int) -> None:
        from ray.util.metrics import Counter, Gauge

        self.tags = {"rank": str(rank), "node": _node_ip()}

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, description=text, tag_keys=TAGS)

        self.images_per_s = gauge("alexnet_train_images_per_s", "training images/s of this rank")
        self.data_wait = gauge("alexnet_train_data_wait", "share of step time waiting for the next batch")
        self.step_s = gauge("alexnet_train_step_s", "mean step time, seconds")
        self.loader = gauge("alexnet_loader_images_per_s", "images the loader delivered per second waited")
        self.usage = {"dali_cpu_util": gauge("alexnet_loader_dali_cpu_util", "DALI pool CPU time / (wall x threads)"),
                      "mem_anon_mb": gauge("alexnet_loader_mem_anon_mb",
                                           "anonymous resident memory of the worker (a leak grows it), MB"),
                      "mem_file_mb": gauge("alexnet_loader_mem_file_mb",
                                           "file-backed resident memory of the worker (mapped tars), MB"),
                      "dali_device_mb": gauge("alexnet_loader_device_mb",
                                              "device memory outside torch's allocator, MB"),
                      "nvjpg_util": gauge("alexnet_loader_nvjpg_util",
                                          "share of time the GPU's hardware JPEG decoder was busy (NVML)")}
        self.val_top1 = gauge("alexnet_val_top1", "val top-1 of the last epoch")
        self.val_top5 = gauge("alexnet_val_top5", "val top-5 of the last epoch")
        self.samples = Counter("alexnet_train_samples_total", description="samples trained by this rank",
                               tag_keys=TAGS)

    def window(self, images: int, steps: int, wait_s: float, step_s: float) -> None:
        """One logged window of this rank: `images` over `steps` steps in `step_s`, of which
        `wait_s` blocked in the loader."""
        if step_s <= 0 or steps <= 0:
            return
        self.images_per_s.set(images / step_s, tags=self.tags)
        self.data_wait.set(wait_s / step_s, tags=self.tags)
        self.step_s.set(step_s / steps, tags=self.tags)
        self.loader.set(images / max(wait_s, 1e-6), tags=self.tags)
        self.samples.inc(images, tags=self.tags)

    def loader_usage(self, usage: dict[str, float | None]) -> None:
        """The loader's CPU share and memory over the window (`train.loader_usage`); None: not measured."""
        for key, value in usage.items():
            if value is not None:
                self.usage[key].set(value, tags=self.tags)

    def epoch(self, top1: float, top5: float) -> None:
        self.val_top1.set(top1, tags=self.tags)
        self.val_top5.set(top5, tags=self.tags)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit tests): the host name will do
        return socket.gethostname()
