"""`python -m orchestration.evaluate RUN_DIR|CHECKPOINT [--shards DIR] [--ten-crop] [--workers N]
[--batch-size B]`: the exact-once val top-1/top-5 of a trained checkpoint.

RUN_DIR takes the newest checkpoint Ray registered for the run; CHECKPOINT names one
(`.../epoch-0006/checkpoint.pt` or its folder). The val split is read through the same
loader and graph as in training (the run's crop, backend and precision; `--ten-crop` is
the paper's test protocol), every sample exactly once, and the sums are divided once, so
the newest checkpoint of a finished run scores the run's own final top-1. One worker runs
in this process without Ray; `--workers N` (N > 1), or a RAY_ADDRESS, runs N workers as a
Ray Train job that splits the val set between them. Prints one line and writes
`eval.json` (`top1`, `top5`, `samples`, `ten_crop`, `checkpoint`) to the run directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from orchestration.artifacts import build_trained_model, load_trained
from orchestration.config import TrainConfig, from_dict
from shards.location import resolve

EVAL_FILE = "eval.json"


def eval_config(state: dict[str, Any], shards: str | None, ten_crop: bool, batch_size: int | None) -> TrainConfig:
    """The run's own config with what this evaluation changes (the shards, the protocol,
    the batch)."""
    raw = dict(state["config"])
    raw.update({k: v for k, v in (("shards_dir", shards), ("batch_size", batch_size)) if v is not None})
    if ten_crop:
        raw["eval_crop"] = "ten_crop"
    return from_dict(raw, origin="the checkpoint's config")


def evaluate_part(state: dict[str, Any], cfg: TrainConfig, rank: int, world_size: int,
                  device: torch.device) -> dict[str, float]:
    """This rank's part of the val split through the training loop's own `evaluate` (its
    sums are all-reduced over the ranks there): top1, top5, val_loss over every sample."""
    from orchestration.loaders import dataset_facts, decoding_args
    from orchestration.train import Ctx, evaluate
    from pipeline import make_loader

    model = build_trained_model(state).to(device)
    on_gpu = device.type == "cuda"
    threads = cfg.dali_threads if cfg.dali_threads not in (0, "auto") else len(os.sched_getaffinity(0))
    args = {**decoding_args(cfg, on_gpu), "num_threads": threads}
    if on_gpu:
        args["device_id"] = torch.cuda.current_device()
    val = make_loader(cfg.shards_dir, split="val", batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                      device="cuda" if on_gpu else "cpu", backend=cfg.backend, crop_size=cfg.crop_size,
                      ten_crop=cfg.eval_crop == "ten_crop", on_corrupt=cfg.on_corrupt,
                      cache_dir=cfg.cache_dir or None, cache_max_gb=cfg.cache_max_gb, **args)
    _, val_size = dataset_facts(cfg.shards_dir, val)
    result = evaluate(model, val, val_size, Ctx(cfg, device, rank, world_size, log_rows=None))
    return {**result, "samples": val_size}


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    cfg = from_dict(config["cfg"])
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    _, state = load_trained(config["checkpoint"])
    result = evaluate_part(state, cfg, context.get_world_rank(), context.get_world_size(), device)
    if context.get_world_rank() == 0:  # every rank holds the all-reduced figures
        config["results"].put(result)


def evaluate_on_ray(checkpoint: str, cfg: TrainConfig, workers: int) -> dict[str, float]:
    """`workers` Ray Train workers, each evaluating its part (the cluster in RAY_ADDRESS, else
    a local Ray); the checkpoint must be where every node reads it (a URI or a shared path)."""
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from orchestration.train import start_ray

    start_ray()
    results = Queue(maxsize=1)  # rank 0's figures back to this process (Ray Train V2 keeps metrics with checkpoints)
    trainer = TorchTrainer(_ray_worker, train_loop_config={"checkpoint": checkpoint, "cfg": cfg.to_dict(),
                                                           "results": results},
                           scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu),
                           run_config=ray.train.RunConfig(name="evaluate",
                                                          storage_path=tempfile.mkdtemp(prefix="alexnet-eval-"),
                                                          logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    trainer.fit()
    return results.get(timeout=60)


def run_of(checkpoint_uri: str) -> str:
    """The run directory a checkpoint file belongs to: `<run>/epoch-NNNN/checkpoint.pt` -> `<run>`."""
    return checkpoint_uri.rstrip("/").rsplit("/", 2)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.evaluate",
                                description="Exact-once val top-1/top-5 of a trained checkpoint.")
    p.add_argument("target", help="a run directory (its newest checkpoint) or a checkpoint file or folder")
    p.add_argument("--shards", default=None, help="the shard set to evaluate on (default: the run's shards_dir)")
    p.add_argument("--ten-crop", action="store_true", help="the paper's protocol: 10 views per image, softmax mean")
    p.add_argument("--workers", type=int, default=1, help="workers splitting the val set (>1: a Ray Train job)")
    p.add_argument("--batch-size", type=int, default=None, help="per worker (default: the run's batch_size)")
    args = p.parse_args(argv)
    try:
        checkpoint, state = load_trained(args.target)
        cfg = eval_config(state, args.shards, args.ten_crop, args.batch_size)
        if args.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {args.workers}")
        if args.workers > 1 or os.environ.get("RAY_ADDRESS"):
            result = evaluate_on_ray(checkpoint, cfg, args.workers)
        else:
            device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
            result = evaluate_part(state, cfg, 0, 1, device)
        record = {"top1": result["top1"], "top5": result["top5"], "samples": int(result["samples"]),
                  "ten_crop": cfg.eval_crop == "ten_crop", "checkpoint": checkpoint, "shards_dir": cfg.shards_dir,
                  "crop_size": cfg.crop_size, "workers": args.workers}
        out = resolve(run_of(checkpoint)) / EVAL_FILE
        out.write_bytes((json.dumps(record, indent=2) + "\n").encode())
    except (ValueError, OSError) as err:  # StorageError and FileNotFoundError included: one line
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    protocol = "ten-crop" if record["ten_crop"] else "centre crop"
    print(f"{checkpoint}: top-1 {record['top1']:.2%}  top-5 {record['top5']:.2%}  on {record['samples']} val "
          f"samples ({protocol}, crop {cfg.crop_size}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
