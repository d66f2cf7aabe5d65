"""A worker's train and val loaders from the run config, and the facts of the shard set the
loop needs (classes, val size, train size).

Each rank reads its own part (`rank`/`world_size`); on a GPU worker DALI decodes on the GPU
Ray gave it (its logical CUDA index). `dali_threads`/`hw_decoder_load` "auto" probe on the
train loader's own part; the val loader then decodes as the train loader was tuned.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from orchestration.config import TrainConfig
from orchestration.distributed import all_reduce_sum
from shards.layouts import CLASSES_FILE, MANIFEST_FILE
from shards.location import resolve

log = logging.getLogger("train")


@dataclass
class Loaders:
    train: Any  # pipeline.make_loader(split="train", return_keys=True)
    val: Any
    num_classes: int
    train_size: int  # samples in the train split, all ranks
    val_size: int  # samples in the val split: what exact evaluation must count


def make_loaders(cfg: TrainConfig, rank: int, world_size: int, device: torch.device, epoch: int) -> Loaders:
    """Both loaders of this rank, the train one positioned at `epoch` (epochs completed)."""
    from pipeline import make_loader
    from pipeline.tuning import describe

    on_gpu = device.type == "cuda"
    args: dict[str, Any] = dict(batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                                device="cuda" if on_gpu else "cpu", backend=cfg.backend, crop_size=cfg.crop_size,
                                seed=cfg.seed, **decoding_args(cfg, on_gpu), on_corrupt=cfg.on_corrupt,
                                cache_dir=cfg.cache_dir or None, cache_max_gb=cfg.cache_max_gb)  # remote shards
    if on_gpu:
        args["device_id"] = torch.cuda.current_device()
    train = make_loader(cfg.shards_dir, split="train", crop=cfg.crop, epoch=epoch, return_keys=True, **args)
    if train.tuning:
        print(f"rank {rank}: DALI {describe(train.tuning)}", flush=True)
    if cfg.backend == "dali":  # "auto" resolved once, on the train part (also where probing was skipped)
        args.update(train.settings)
    val = make_loader(cfg.shards_dir, split="val", ten_crop=cfg.eval_crop == "ten_crop", **args)
    num_classes, val_size = dataset_facts(cfg.shards_dir, val)
    return Loaders(train, val, num_classes, train.dataset_size, val_size)


def decoding_args(cfg: TrainConfig, on_gpu: bool) -> dict:
    """make_loader's `num_threads` and `hw_decoder_load` from the config: "auto" probes (DALI);
    dali_threads 0 is 1 thread on a CPU worker (its cores train) and "auto" on a GPU worker."""
    threads = cfg.dali_threads or ("auto" if on_gpu else 1)
    if cfg.backend == "torch":  # DataLoader workers; nothing to probe
        return {"num_threads": 4 if threads == "auto" else threads}
    return {"num_threads": threads, "hw_decoder_load": cfg.hw_decoder_load if on_gpu else None}


def dataset_facts(shards_dir: str, val_loader) -> tuple[int, int]:
    """(number of classes, val size): classes.json and the manifest where the shard set has
    them (a path or a URI); otherwise the highest label is unknown, so classes.json is required."""
    root = resolve(shards_dir)
    classes = root / CLASSES_FILE
    if not classes.is_file():
        raise FileNotFoundError(f"{classes}: missing; re-pack with `python -m shards build`")
    num_classes = len(json.loads(classes.read_text()))
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        split = pq.read_table(manifest.path, filesystem=manifest.fs, columns=["split"]).column("split")
        val_size = int(pc.sum(pc.equal(split, "val")).as_py() or 0)
    else:
        val_size = int(all_reduce_sum([float(val_loader.num_samples)])[0])
    return num_classes, val_size
