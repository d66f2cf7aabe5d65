"""Train AlexNet on Ray Train: `python orchestration/train.py --config FILE [--set key=value ...]`.

Reads top to bottom: the loss/optimizer/schedule helpers, `train_one_epoch`, `evaluate`,
the per-worker function `train_worker` (config -> loaders -> model/optimizer -> resume ->
loop), and `main` (config -> Ray -> TorchTrainer -> summary). Without RAY_ADDRESS it starts
an embedded local Ray; as a Ray job (`ray job submit ... -- python orchestration/train.py`)
it joins the job's cluster.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestration import checkpoint
from orchestration.checkpoint import unwrap
from orchestration.config import TrainConfig, check_shards, from_dict, load_config
from orchestration.ledger import SampleLedger, rollback
from orchestration.metrics import MetricsLog, fmt_pct, plot_curves, summarize
from orchestration.preemption import Preempted, install_preemption
from orchestration.ray_metrics import TrainMetrics
from orchestration.resume import (Position, StepCheckpoints, gather_rank_states, restore_rank_state,
                                  wait_until_registered)
from orchestration.schedule import LrSchedule, peak_lr
from orchestration.run_dir import (CURVES, METRICS, STATE, SUMMARY, check_storage, ray_storage, read_state,
                                   read_summary, run_location, write_json)
from pipeline.usage import DaliThreads, memory_mb
from shards.layouts import CLASSES_FILE, MANIFEST_FILE
from shards.location import StorageError, resolve

log = logging.getLogger("train")


# ---------------------------------------------------------------- recipe helpers
def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum; no weight decay on biases and norm parameters (1-d tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0 if cfg.model == "alexnet-bn" else cfg.weight_decay}]
    return torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64, one collective); identity on one process."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics before eval (DDP broadcasts them only
    at the start of a training forward, and eval runs on the unwrapped module)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)


@dataclass
class Ctx:
    """What train_one_epoch/evaluate need besides model and data."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world_size: int
    log_rows: MetricsLog | None  # rank 0 only
    gauges: TrainMetrics | None = None  # Ray's Prometheus endpoint, every rank
    dali_threads: DaliThreads | None = None  # the train loader's DALI pool (None: the torch baseline)


# ---------------------------------------------------------------- one epoch
def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    schedule: LrSchedule, epoch: int, pos: Position, ctx: Ctx,
                    hooks: StepCheckpoints) -> dict[str, float]:
    """Train the rest of one pass over `loader` (all of it, or from `pos.epoch_step` on a
    resume); `pos` counts on in place. Returns the figures of the steps trained here.

    Data-wait is the time blocked in `next(loader)` over the whole step time (wait + compute);
    images/s and data-wait are summed over ranks at each logged step (one all_reduce).
    """
    cfg = ctx.cfg
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"
                              and ctx.device.type == "cuda")
    # no host-device sync but at log steps: the loss sum stays on the device, counts on the host
    win_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    epoch_tot = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss sum, samples, wait s, step s, images
    win_wait = win_time = 0.0
    win_images = win_steps = 0
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        t1 = time.perf_counter()
        if batch is None:
            break
        images, labels = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        schedule.before_step(pos.epoch, pos.epoch_samples)
        with autocast:
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pos.step += 1
        pos.epoch_step += 1
        pos.samples += cfg.batch_size * ctx.world_size
        pos.epoch_samples += cfg.batch_size * ctx.world_size
        win_loss += loss.detach().double() * labels.numel()
        win_wait += t1 - t0
        win_images += labels.numel()
        win_steps += 1
        if pos.step % cfg.log_every == 0 or pos.epoch_step == len(loader):
            loss_sum = win_loss.item()  # syncs the device: the step times below are real
            win_time += time.perf_counter() - t0
            if ctx.gauges is not None:
                ctx.gauges.window(win_images, win_steps, win_wait, win_time)
            usage = loader_usage(ctx)
            if ctx.gauges is not None:
                ctx.gauges.loader_usage(usage)
            sums = all_reduce_sum([loss_sum, win_images, win_wait, win_time, win_images]
                                  + [v or 0.0 for v in usage.values()])
            _add(epoch_tot, sums[:5])
            figures = _rates(sums[:5], ctx.world_size)
            if ctx.log_rows is not None:  # usage: the mean over ranks
                ctx.log_rows.log_step(epoch, pos.step, figures["loss"], current_lr(optimizer),
                                      figures["images_per_s"], figures["data_wait"],
                                      **{k: None if v is None else total / ctx.world_size
                                         for (k, v), total in zip(usage.items(), sums[5:])})
                log.info("epoch %d step %d  loss %.4f  lr %.5f  %.0f img/s  data-wait %s", epoch, pos.step,
                         figures["loss"], current_lr(optimizer), figures["images_per_s"],
                         fmt_pct(figures["data_wait"]))
            win_loss.zero_()
            win_wait = win_time = 0.0
            win_images = win_steps = 0
        else:
            win_time += time.perf_counter() - t0
        hooks.after_step(epoch, pos, batch[2], len(loader))
    if win_images:  # a tail shorter than log_every (not logged as a row, counted in the epoch)
        _add(epoch_tot, all_reduce_sum([win_loss.item(), win_images, win_wait, win_time, win_images]))
    return _rates(epoch_tot, ctx.world_size)


def loader_usage(ctx: Ctx) -> dict[str, float | None]:
    """This rank's loader since the last log step: its DALI threads' CPU use (a share of
    dali_threads cores) and memory (pipeline.usage)."""
    rss, device_mb = memory_mb(ctx.device)
    util = ctx.dali_threads.utilisation() if ctx.dali_threads is not None else None
    return {"dali_cpu_util": util, "rss_mb": rss, "dali_device_mb": device_mb}


def _add(total: list[float], more: list[float]) -> None:
    for i, v in enumerate(more):
        total[i] += v


def _rates(sums: list[float], world_size: int) -> dict[str, float]:
    loss_sum, n, wait_s, step_s, images = sums
    mean_step_s = step_s / world_size  # ranks run in lock-step under DDP
    return {"loss": loss_sum / max(n, 1), "images_per_s": images / mean_step_s if mean_step_s else 0.0,
            "data_wait": wait_s / step_s if step_s else 0.0}


@torch.no_grad()
def evaluate(model: nn.Module, loader, val_size: int, ctx: Ctx) -> dict[str, float]:
    """Exact val top-1/top-5/loss: each rank sums (loss, top1, top5, count) over its own part,
    one all_reduce(SUM), divide once. Ten-crop batches [B,10,3,H,W] average the 10 softmaxes."""
    sync_buffers(model)
    net = unwrap(model)  # no DDP collectives: ranks may hold different numbers of batches
    net.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.cfg.precision == "bf16"
                              and ctx.device.type == "cuda")
    sums = torch.zeros(4, dtype=torch.float64)
    skipped_before = len(loader.skipped)
    for batch in loader:
        images, labels = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        if labels.numel() == 0:
            continue
        views = images.shape[1] if images.ndim == 5 else 1
        images = images.flatten(0, 1) if images.ndim == 5 else images
        if ctx.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = net(images).float()
        probs = logits.softmax(dim=1).view(labels.numel(), views, -1).mean(dim=1)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.tensor([loss.item(), hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                              labels.numel()], dtype=torch.float64)
    loss_sum, top1, top5, count, skipped = all_reduce_sum(sums.tolist() + [len(loader.skipped) - skipped_before])
    assert int(count + skipped) == val_size, (f"evaluated {int(count)} val samples and skipped {int(skipped)} "
                                              f"corrupt ones, the val split holds {val_size}")
    return {"val_loss": loss_sum / count, "top1": top1 / count, "top5": top5 / count, "val_skipped": skipped}


# ---------------------------------------------------------------- the per-worker function
def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker: config -> loaders -> model/optimizer -> resume -> loop."""
    import ray
    import ray.train
    import ray.train.torch

    from model import build_model
    from pipeline import make_loader
    from pipeline.tuning import describe

    cfg = from_dict(config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    attempt_start = time.perf_counter()
    install_preemption()  # SIGTERM: a step checkpoint at the next step, then a restart from it
    device = setup_compute(cfg, context.get_local_world_size())
    run = run_location(cfg.run_dir)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    # resume: every rank loads the one checkpoint Ray hands out (its newest registered one)
    ckpt = checkpoint.restore()
    pos = Position.of(ckpt)
    state = read_state(run) if rank == 0 else {}  # rank 0's alone: the others would race its writes
    if rank == 0:
        if not run.remote:
            run.mkdir()
        attempt_row = {"world_size": world_size, "resumed_at": pos.step if ckpt else None,
                       "rank0_node": ray.get_runtime_context().get_node_id(),
                       "epochs_done": pos.epoch, "epoch_samples": pos.epoch_samples,
                       "started_unix": time.time(), "first_step_unix": None}
        state = {"starts": state["starts"] + 1, "elapsed_s": state["elapsed_s"] if ckpt else 0.0,
                 "resumed_at": state.get("resumed_at", []) + ([pos.step] if ckpt else []),
                 "attempts": state.get("attempts", []) + [attempt_row]}  # every start, as `starts` counts
        write_json(run / STATE, state)
        rollback(run, pos.step, attempt=state["starts"])  # ledger rows of steps the restart undid
        if ckpt:
            log.info("resuming %s at step %d (epoch %d + %d steps; start %d of this run)", run, pos.step,
                     pos.epoch, pos.epoch_step, state["starts"])
    attempt = all_reduce_sum([float(state["starts"]) if rank == 0 else 0.0])[0]

    # data: each rank its own part; DALI on the GPU Ray gave this worker (a logical index)
    on_gpu = device.type == "cuda"
    loader_args = dict(batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                       device="cuda" if on_gpu else "cpu", backend=cfg.backend,  # both: batches on the GPU
                       crop_size=cfg.crop_size, seed=cfg.seed,
                       **decoding_args(cfg, on_gpu),
                       cache_dir=cfg.cache_dir or None, cache_max_gb=cfg.cache_max_gb,  # remote shards
                       on_corrupt=cfg.on_corrupt)
    if on_gpu:
        loader_args["device_id"] = torch.cuda.current_device()
    train_loader = make_loader(cfg.shards_dir, split="train", crop=cfg.crop, epoch=pos.epoch, return_keys=True,
                               **loader_args)
    if train_loader.tuning:  # "auto": each worker's choice on its own part; val decodes the same way
        print(f"rank {rank}: DALI {describe(train_loader.tuning)}", flush=True)
        loader_args.update(num_threads=train_loader.spec.num_threads,
                           hw_decoder_load=train_loader.spec.hw_decoder_load)
    val_loader = make_loader(cfg.shards_dir, split="val", ten_crop=cfg.eval_crop == "ten_crop", **loader_args)
    num_classes, val_size = read_dataset_facts(cfg.shards_dir, val_loader)

    # model and optimiser; the lr schedule runs on samples seen, whatever the shape
    global_batch = cfg.batch_size * world_size
    model = build_model(cfg.model, num_classes=num_classes)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    if cfg.grad_compression == "bf16" and world_size > 1:
        compress_gradients_bf16(model)
        if rank == 0:
            log.info("grad_compression bf16: DDP all-reduces the gradients in bf16")
    optimizer = make_optimizer(cfg, unwrap(model))
    schedule = LrSchedule(cfg, optimizer, global_batch, train_loader.spec.data.num_samples)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    metrics = MetricsLog(run / METRICS, resume_epoch=pos.epoch, resume_step=pos.step,
                         world_size=world_size) if rank == 0 else None
    ctx = Ctx(cfg, device, rank, world_size, metrics, TrainMetrics(rank),
              DaliThreads(train_loader.spec.num_threads) if cfg.backend == "dali" else None)
    ledger = SampleLedger(run, rank, int(attempt), cfg.audit_samples)
    if rank == 0:
        log.info("%s: %d worker(s) x batch %d = %d per step, %d steps/epoch, peak lr %.4g, %d classes, %d val",
                 cfg.model, world_size, cfg.batch_size, global_batch, train_loader.spec.data.num_samples
                 // world_size // cfg.batch_size, peak_lr(cfg, global_batch), num_classes, val_size)

    def save(at: Position, metrics_row: dict, epoch_end: bool = False) -> None:
        """A checkpoint of the run as it stands, every rank taking part (see orchestration.resume)."""
        ledger.commit()  # before the report: every row of a registered checkpoint is on storage
        if metrics is not None:
            metrics.flush()
        ranks = gather_rank_states(rank, world_size, train_loader)
        at.world_size, at.batch_size = world_size, cfg.batch_size
        checkpoint.report(metrics_row, rank=rank, save=True, model=model, optimizer=optimizer,
                          scheduler=schedule, epoch=at.epoch, config=cfg.to_dict(),
                          step=None if epoch_end else at.step, position=at.to_dict(), ranks=ranks)

    def first_step() -> None:  # how long the restart took: state.json's attempts
        if rank == 0:
            state["attempts"][-1]["first_step_unix"] = time.time()
            write_json(run / STATE, state)

    hooks = StepCheckpoints(cfg, ledger, save, resumed_step=pos.step, first_step=first_step)
    # last before the loop (building the model draws from the RNGs): loader position and RNGs
    if not restore_rank_state(ckpt, rank, world_size, cfg.batch_size, train_loader):
        pos.epoch_step = 0  # the epoch's data starts afresh (a new shape, or an epoch-end checkpoint)
    for epoch in range(pos.epoch + 1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        if pos.epoch_step == 0:
            train_loader.set_epoch(epoch - 1)
        skipped_before = len(train_loader.skipped)
        train = train_one_epoch(model, train_loader, criterion, optimizer, schedule, epoch, pos, ctx, hooks)
        val = evaluate(model, val_loader, val_size, ctx)
        skipped = int(all_reduce_sum([len(train_loader.skipped) - skipped_before])[0] + val.pop("val_skipped"))
        schedule.after_epoch(val["top1"])
        ctx.gauges.epoch(val["top1"], val["top5"])
        pos.epoch, pos.epoch_step, pos.epoch_samples = epoch, 0, 0
        if rank == 0:
            metrics.log_epoch(epoch, pos.step, train["loss"], current_lr(optimizer), train["images_per_s"],
                              train["data_wait"], val["top1"], val["top5"], skipped)
            log.info("epoch %d/%d  train loss %.3f  val loss %.3f  top-1 %s  top-5 %s  %.0f img/s  "
                     "data-wait %s  %.0fs", epoch, cfg.epochs, train["loss"], val["val_loss"],
                     fmt_pct(val["top1"]), fmt_pct(val["top5"]), train["images_per_s"],
                     fmt_pct(train["data_wait"]), time.perf_counter() - t_epoch)
        # every rank reports (a barrier); rank 0 attaches the checkpoint, Ray uploads it
        row = {"epoch": epoch, "step": pos.step, **train, **val}
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            save(pos, row, epoch_end=True)
        else:
            checkpoint.report(row, rank=rank, save=False, model=model, optimizer=optimizer, scheduler=None,
                              epoch=epoch, config={})
        if rank == 0:
            state["elapsed_s"] += time.perf_counter() - attempt_start
            attempt_start = time.perf_counter()
            write_json(run / STATE, state)
        if hooks.stopping:
            wait_until_registered()
            raise Preempted(f"SIGTERM: stopped after the checkpoint of epoch {epoch}; Ray Train resumes from it")
        if cfg.fail_at_epoch == epoch and Position.of(ckpt).epoch < epoch:
            wait_until_registered()
            raise RuntimeError(f"fail_at_epoch={epoch}: injected worker failure (tests only)")

    if rank == 0:
        rows = metrics.epoch_rows()
        summary = summarize(rows, wall_s=state["elapsed_s"], world_size=world_size, restarts=state["starts"] - 1)
        summary.update(resumed_at=state["resumed_at"], world_sizes=[a["world_size"] for a in state["attempts"]],
                       skipped_samples=sum(r["skipped_samples"] or 0 for r in rows))
        plot_curves(rows, run / CURVES, title=f"{cfg.name}: {cfg.model}, {world_size} worker(s)",
                    resizes=resizes(state["attempts"], train_loader.spec.data.num_samples))
        write_json(run / SUMMARY, summary)


def resizes(attempts: list[dict], train_size: int) -> list[tuple[float, int, int]]:
    """(epochs of training done, world size before, after) at each restart that changed the world size."""
    return [(a["epochs_done"] + a["epoch_samples"] / train_size, before["world_size"], a["world_size"])
            for before, a in zip(attempts, attempts[1:]) if a["world_size"] != before["world_size"]]


def compress_gradients_bf16(model: nn.Module) -> None:
    """DDP all-reduces each gradient bucket cast to bf16 (half the bytes on the wire), then
    casts back and divides by the world size: torch's `bf16_compress_hook`. DDP refuses that
    hook by name without CUDA + NCCL; the function itself runs on gloo too, so it is
    registered under another name (docs/SCALING.md measures both)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

    def bf16_allreduce(state, bucket):
        return bf16_compress_hook(state, bucket)

    model.register_comm_hook(None, bf16_allreduce)


def decoding_args(cfg: TrainConfig, on_gpu: bool) -> dict:
    """make_loader's `num_threads` and `hw_decoder_load` from the config: "auto" probes (DALI);
    dali_threads 0 is 1 thread on a CPU worker (its cores train) and "auto" on a GPU worker."""
    threads = cfg.dali_threads or ("auto" if on_gpu else 1)
    if cfg.backend == "torch":  # DataLoader workers; nothing to probe
        return {"num_threads": 4 if threads == "auto" else threads}
    return {"num_threads": threads, "hw_decoder_load": cfg.hw_decoder_load if on_gpu else None}


def setup_compute(cfg: TrainConfig, local_workers: int) -> torch.device:
    """The worker's device; on CPU, torch threads = this node's cores shared by its workers."""
    import ray.train.torch

    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(cfg.torch_threads or max(1, cores // max(1, local_workers)))
    return device


def read_dataset_facts(shards_dir: str, val_loader) -> tuple[int, int]:
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


# ---------------------------------------------------------------- the driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train AlexNet on Ray Train (DALI input pipeline).")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set epochs=2")
    return p.parse_args(argv)


def start_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else an embedded local Ray
    on loopback (its dashboard too: Ray Train's clean-up actor polls the state API behind it)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")


def print_summary(summary: dict, run_dir: str) -> None:
    print(f"top-1 {fmt_pct(summary['top1'])}  top-5 {fmt_pct(summary['top5'])}  "
          f"{summary['images_per_s']:.0f} images/s  data-wait {fmt_pct(summary['data_wait'])}  "
          f"({summary['epochs']} epochs, {summary['world_size']} worker(s), {summary['wall_s']:.0f}s training, "
          f"{summary['restarts']} restart(s))")
    print(f"run directory: {run_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # everything a user can get wrong, in one line, before Ray starts
        cfg = load_config(args.config, args.set)
        check_storage(cfg.storage_path)
        check_shards(cfg)
        run = run_location(cfg.run_dir)
        summary = read_summary(run)
    except (ValueError, FileNotFoundError, StorageError) as err:
        raise SystemExit(f"error: {err}") from None
    print("config: " + json.dumps(cfg.to_dict()))
    if summary is not None:
        print(f"run {cfg.name} already finished (delete {run} or pick another --set name=... to train again)")
        print_summary(summary, cfg.run_dir)
        return 0

    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    start_ray()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(  # workers: [min, max] is elastic (a resize restarts
            num_workers=cfg.workers, use_gpu=cfg.use_gpu,  # from the newest checkpoint)
            elastic_resize_monitor_interval_s=cfg.elastic_resize_monitor_interval_s),
        run_config=ray.train.RunConfig(
            name=cfg.name, **ray_storage(cfg.storage_path),  # Ray's files and ours: one resolver
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise SystemExit(f"error: {checkpoint.failure_line(err, run)}") from None
    print_summary(read_summary(run), cfg.run_dir)
    kept = [c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints]
    print(f"checkpoints kept by Ray Train (newest last): {', '.join(kept)}")
    print(f"wall time of this command: {time.perf_counter() - t0:.0f}s (Ray start-up included)")
    return 0


if __name__ == "__main__":
    from orchestration.train import main as _main  # the importable module, so Ray pickles by reference

    sys.exit(_main())
