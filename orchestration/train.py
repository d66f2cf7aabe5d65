"""Train AlexNet on Ray Train: `python orchestration/train.py --config FILE [--set key=value ...]`.

Reads top to bottom: the recipe helpers, `train_one_epoch`, `evaluate`, the per-worker
function `train_worker` (config -> loaders -> model/optimizer -> resume -> loop -> summary),
and `main` (config -> Ray -> TorchTrainer -> summary). Each mechanism the loop calls lives
in a module of its own beside this one: `loaders`, `compute`, `resume` (checkpoints, step
hooks), `run_book` (state.json, summary), `step_window`, `metrics`, `ray_metrics`, `ledger`.
Without RAY_ADDRESS it starts an embedded local Ray; as a Ray job (`ray job submit ... --
python orchestration/train.py`) it joins the job's cluster.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from orchestration import checkpoint
from orchestration.compute import autocast, grad_scaler, prepare, setup_compute
from orchestration.config import TrainConfig, check_shards, describe_keys, from_dict, load_config, valid_keys
from orchestration.distributed import all_reduce_sum, sync_buffers, unwrap
from orchestration.ledger import SampleLedger
from orchestration.loaders import make_loaders
from orchestration.metrics import MetricsLog, fmt_pct
from orchestration.preemption import install_preemption
from orchestration.ray_metrics import TrainMetrics
from orchestration.resume import Callback, Position, Saver, StepHooks, restore, start_from
from orchestration.run_book import RunBook
from orchestration.run_dir import (
    METRICS,
    SUMMARY,
    check_run_files,
    check_storage,
    ray_storage,
    read_summary,
    run_location,
)
from orchestration.schedule import LrSchedule, lr_at, peak_lr
from orchestration.step_window import Totals, Window
from orchestration.tracking import Tracker, check_mlflow, step_scalars
from pipeline.nvjpg import NvjpgMeter
from pipeline.usage import DaliThreads, memory_mb
from shards.location import StorageError, resolve
from shards.store_check import applied_settings, settings_line

log = logging.getLogger("train")


# ---------------------------------------------------------------- recipe helpers
def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum; in a network with BatchNorm, no weight decay on biases and norm
    parameters (1-d tensors); the paper's LRN networks decay every weight."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0 if batch_norm else cfg.weight_decay}]
    return torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


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
    clock: Callable[[], float] = time.perf_counter  # what step and wait times are read from
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    tracker: Tracker | None = None  # TensorBoard, train.log, MLflow (rank 0)
    total_steps: int = 0  # the run's steps at this world size: the console's step/total and ETA
    since: tuple[float, int] | None = None  # (clock, step) at this start's first logged step
    nvjpg: NvjpgMeter | None = None  # the GPU's hardware JPEG decoder (None: CPU worker)


# ---------------------------------------------------------------- one epoch
def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    schedule: LrSchedule, epoch: int, pos: Position, ctx: Ctx, hooks: StepHooks) -> dict[str, float]:
    """Train the rest of one pass over `loader` (all of it, or from `pos.epoch_step` on a
    resume); `pos` counts on in place. Returns the figures of the steps trained here.

    Data-wait is the time blocked in `next(loader)` over the whole step time (wait + compute);
    images/s and data-wait are summed over ranks at each logged step (one all_reduce).
    """
    cfg, clock = ctx.cfg, ctx.clock
    model.train()
    window, epoch_totals = Window(ctx.device), Totals()
    it = iter(loader)
    while True:
        t0 = clock()
        batch = next(it, None)
        t1 = clock()
        if batch is None:
            break
        images, labels = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        schedule.before_step(pos.epoch, pos.epoch_samples)
        with autocast(cfg, ctx.device):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()  # fp16: a scaled loss, unscaled before the step; else a no-op
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
        pos.advance(cfg.batch_size * ctx.world_size)
        window.add(loss, labels.numel(), t1 - t0)
        if pos.step % cfg.log_every == 0 or pos.epoch_step == len(loader):
            mine = window.totals()  # syncs the device: the step times below are real
            window.step_s += clock() - t0
            mine.step_s = window.step_s
            epoch_totals.add(log_window(window, mine, epoch, pos, optimizer, ctx))
            window.reset()
        else:
            window.step_s += clock() - t0
        hooks.after_step(epoch, pos, batch[2], len(loader))
    if window.images:  # a tail shorter than log_every (not logged as a row, counted in the epoch)
        epoch_totals.add(Totals(*all_reduce_sum(window.totals().as_list())))
    return epoch_totals.rates(ctx.world_size)


def log_window(window: Window, mine: Totals, epoch: int, pos: Position, optimizer: torch.optim.Optimizer,
               ctx: Ctx) -> Totals:
    """A logged step: this rank's gauges, the window summed over ranks (one all_reduce, with
    the loader's usage), a metrics row and a log line on rank 0. Returns the summed window."""
    usage = loader_usage(ctx)
    if ctx.gauges is not None:
        ctx.gauges.window(window.images, window.steps, window.wait_s, window.step_s)
        ctx.gauges.loader_usage(usage)
    sums = all_reduce_sum(mine.as_list() + [v or 0.0 for v in usage.values()])
    total = Totals(*sums[:4])
    figures = total.rates(ctx.world_size)
    if ctx.log_rows is not None:  # usage: the mean over ranks
        means = {k: None if v is None else s / ctx.world_size for (k, v), s in zip(usage.items(), sums[4:])}
        ctx.log_rows.log_step(epoch, pos.step, figures["loss"], current_lr(optimizer), figures["images_per_s"],
                              figures["data_wait"], **means)
        if ctx.tracker is not None:
            ctx.tracker.scalars(pos.step, step_scalars(figures, current_lr(optimizer), means))
        log.info("epoch %d step %d/%d  loss %.4f  lr %.5f  %.0f img/s  data-wait %s  %s", epoch, pos.step,
                 ctx.total_steps, figures["loss"], current_lr(optimizer), figures["images_per_s"],
                 fmt_pct(figures["data_wait"]), eta(ctx, pos.step))
    return total


def eta(ctx: Ctx, step: int) -> str:
    """`ETA 12m05s` for the steps left, at this start's pace so far (validation not included)."""
    now = ctx.clock()
    if ctx.since is None:
        ctx.since = (now, step)
        return "ETA -"
    t0, s0 = ctx.since
    if step <= s0 or now <= t0:
        return "ETA -"
    left = max(0, ctx.total_steps - step) * (now - t0) / (step - s0)
    minutes, seconds = divmod(int(left), 60)
    return f"ETA {minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"ETA {minutes}m{seconds:02d}s"


def loader_usage(ctx: Ctx) -> dict[str, float | None]:
    """This rank's loader since the last log step: its DALI threads' CPU use (a share of
    dali_threads cores), memory (pipeline.usage) and, on a GPU, how busy the hardware JPEG
    decoder is (pipeline.nvjpg)."""
    util = ctx.dali_threads.utilisation() if ctx.dali_threads is not None else None
    nvjpg = ctx.nvjpg.read() if ctx.nvjpg is not None else None
    return {"dali_cpu_util": util, **memory_mb(ctx.device), "nvjpg_util": nvjpg}


@torch.no_grad()
def evaluate(model: nn.Module, loader, val_size: int, ctx: Ctx) -> dict[str, float]:
    """Exact val top-1/top-5/loss: each rank sums (loss, top1, top5, count) over its own part,
    one all_reduce(SUM), divide once. Ten-crop batches [B,10,3,H,W] average the 10 softmaxes."""
    sync_buffers(model)
    net = unwrap(model)  # no DDP collectives: ranks may hold different numbers of batches
    net.eval()
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
        with autocast(ctx.cfg, ctx.device):
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
def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO, the others WARNING. Ray Train's INFO lines from the workers (moving
    the model, wrapping it in DDP, every report and checkpoint: ours say what matters once)
    are left out; the controller's lines (where each rank was placed) stay."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):  # a logger Ray names by its file
        if "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def train_worker(config: dict, callbacks: Sequence[Callback] = ()) -> None:
    """Runs on every Ray Train worker: config -> loaders -> model/optimizer -> resume -> loop -> summary."""
    import ray.train

    from model import build_model

    started = time.perf_counter()  # this start's time counts from here (restart costs included)
    cfg = from_dict(config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    setup_logging(rank)
    install_preemption()  # SIGTERM: a checkpoint at the next step, then a restart from it
    device = setup_compute(cfg, context.get_local_world_size())
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    ckpt = checkpoint.restore()  # Ray hands every rank the same one: its newest registered checkpoint
    pos, run = Position.of(ckpt), run_location(cfg.run_dir)
    with Tracker(cfg, run, rank) as tracker:  # rank 0's log also goes to <run_dir>/train.log, even if this start fails
        book = RunBook(run, rank, world_size, pos, resumed=ckpt is not None, started=started)

        data = make_loaders(cfg, rank, world_size, device, epoch=pos.epoch)

        global_batch = cfg.batch_size * world_size  # the lr schedule runs on samples seen, whatever the shape
        model = build_model(cfg.model, num_classes=data.num_classes)
        if ckpt is None and cfg.init_from:  # a new run from trained weights (a resumed one has its own)
            log.info(start_from(model, cfg.init_from))
        model = prepare(model, cfg, world_size)
        optimizer = make_optimizer(cfg, unwrap(model))
        schedule = LrSchedule(cfg, optimizer, global_batch, data.train_size)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        metrics = MetricsLog(run / METRICS, pos.epoch, pos.step, world_size) if rank == 0 else None
        ctx = Ctx(cfg, device, rank, world_size, metrics, TrainMetrics(rank),
                  DaliThreads(data.train.settings["num_threads"]) if cfg.backend == "dali" else None,
                  scaler=grad_scaler(cfg, device), tracker=tracker,
                  nvjpg=NvjpgMeter(device) if device.type == "cuda" else None,
                  total_steps=cfg.epochs * len(data.train))
        ledger = SampleLedger(run, rank, book.attempt, cfg.audit_samples)
        saver = Saver(cfg, rank, world_size, model, optimizer, schedule, data.train, ledger, metrics)
        hooks = StepHooks(cfg, saver, ledger, book, resumed=pos, callbacks=callbacks)
        log.info("%s: %d worker(s) x batch %d = %d per step, %d steps/epoch, peak lr %.4g, %d classes, %d val",
                 cfg.model, world_size, cfg.batch_size, global_batch, data.train_size // global_batch,
                 peak_lr(cfg, global_batch), data.num_classes, data.val_size)

        if not restore(ckpt, rank, world_size, cfg.batch_size, model, optimizer, schedule, data.train):
            pos.epoch_step = 0  # the epoch's data starts afresh (a new shape, or an epoch-end checkpoint)
        for epoch in range(pos.epoch + 1, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            if pos.epoch_step == 0:
                data.train.set_epoch(epoch - 1)
            skipped_before = len(data.train.skipped)
            train = train_one_epoch(model, data.train, criterion, optimizer, schedule, epoch, pos, ctx, hooks)
            val = evaluate(model, data.val, data.val_size, ctx)
            skipped = int(all_reduce_sum([len(data.train.skipped) - skipped_before])[0] + val.pop("val_skipped"))
            schedule.after_epoch(val["top1"])
            ctx.gauges.epoch(val["top1"], val["top5"])
            pos.end_epoch(epoch)
            if metrics is not None:
                metrics.log_epoch(epoch, pos.step, train["loss"], current_lr(optimizer), train["images_per_s"],
                                  train["data_wait"], val["top1"], val["top5"], skipped)
            log.info("epoch %d/%d  train loss %.3f  val loss %.3f  top-1 %s  top-5 %s  %.0f img/s  data-wait %s  %.0fs",
                     epoch, cfg.epochs, train["loss"], val["val_loss"], fmt_pct(val["top1"]), fmt_pct(val["top5"]),
                     train["images_per_s"], fmt_pct(train["data_wait"]), time.perf_counter() - t_epoch)
            tracker.scalars(pos.step, {"val/top1": val["top1"], "val/top5": val["top5"], "val/loss": val["val_loss"],
                                       "train/epoch_loss": train["loss"]})
            tracker.flush()
            hooks.after_epoch(epoch, pos, {"epoch": epoch, "step": pos.step, **train, **val})

        book.finish(metrics, f"{cfg.name}: {cfg.model}, {world_size} worker(s)", data.train_size)


# ---------------------------------------------------------------- the driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train AlexNet on Ray Train (DALI input pipeline).",
                                epilog=describe_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set epochs=2 --set lr=1e-3")
    args, extra = p.parse_known_args(argv)
    if extra:
        p.error(_set_hint(extra))
    return args


def _set_hint(extra: list[str]) -> str:
    """`--epochs 3` -> the line that says to write `--set epochs=3`."""
    flag, _, value = extra[0].partition("=")
    key = flag.lstrip("-").replace("-", "_")
    if not value and len(extra) > 1 and not extra[1].startswith("--"):
        value = extra[1]
    if flag.startswith("--") and key in valid_keys():
        return f"{' '.join(extra[:2]) if value and '=' not in extra[0] else extra[0]}: config keys are set with " \
               f"--set: --set {key}={value or '...'}"
    return f"unrecognized arguments: {' '.join(extra)} (config keys: --set key=value; --help lists them)"


def start_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else an embedded local Ray
    on loopback (its dashboard too: Ray Train's clean-up actor polls the state API behind it)."""
    import ray

    if ray.is_initialized():
        return
    # the storage pre-flight's checksum settings reach the controller and every worker
    env = {"runtime_env": {"env_vars": applied_settings()}} if applied_settings() else {}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, **env)
    else:
        ray.init(address="local", dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **env)


def print_summary(summary: dict, run_dir: str) -> None:
    print(f"top-1 {fmt_pct(summary['top1'])}  top-5 {fmt_pct(summary['top5'])}  "
          f"{summary['images_per_s']:.0f} images/s  data-wait {fmt_pct(summary['data_wait'])}  "
          f"({summary['epochs']} epochs, {summary['world_size']} worker(s), {summary['wall_s']:.0f}s training, "
          f"{summary['restarts']} restart(s))")
    print(f"run directory: {run_dir}")


def continue_line(cfg: TrainConfig, done: int) -> str:
    """What raising `epochs` on a run that finished `done` epochs does, the lr included."""
    before = lr_at(cfg.model_copy(update={"epochs": done}), cfg.global_batch, float(done), 0.0)
    after = lr_at(cfg, cfg.global_batch, float(done), 0.0)
    lr = ("the lr stays where the plateau rule left it" if cfg.schedule == "plateau" else
          f"the {cfg.schedule} schedule now spans {cfg.epochs} epochs, so the lr goes from {before:.3g} "
          f"(the end of epoch {done}) to {after:.3g} for epoch {done + 1}")
    return f"run {cfg.name} finished {done} epochs; continuing to {cfg.epochs} from its last checkpoint: {lr}"


def check_placement(cfg: TrainConfig) -> None:
    """A machine (the embedded local Ray, or the Ray this process already runs) that can never
    place `workers` (one CPU each, and one GPU each with use_gpu): one line, instead of Ray's
    retries."""
    import ray

    if ray.is_initialized():  # a Ray this process already runs (embedded, or joined): what it has
        have, where = ray.cluster_resources(), "the running Ray"
        cpus, gpus = int(have.get("CPU", 0)), int(have.get("GPU", 0))
    elif os.environ.get("RAY_ADDRESS"):
        return  # a cluster: Ray places the workers (an autoscaler may add nodes)
    else:
        cpus, gpus, where = len(os.sched_getaffinity(0)), torch.cuda.device_count(), "this machine"
    need = cfg.min_workers
    if cfg.use_gpu:
        if gpus < need:
            raise ValueError(f"workers: {list(cfg.workers) if cfg.elastic else cfg.workers} needs {need} GPU(s) "
                             f"(use_gpu: true), {where} has {gpus}; lower workers, set use_gpu: false, or "
                             "join a cluster (RAY_ADDRESS)")
        return
    if cpus < need:
        raise ValueError(f"workers: {list(cfg.workers) if cfg.elastic else cfg.workers} needs {need} CPUs (one per "
                         f"worker), {where} has {cpus}; lower workers or join a cluster (RAY_ADDRESS)")


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """The command; `callbacks` run on every worker after each checkpoint (tests inject faults)."""
    args = parse_args(argv)
    try:  # everything a user can get wrong, in one line, before Ray starts
        cfg = load_config(args.config, args.set)
        check_placement(cfg)
        check_mlflow(cfg)
        store = check_storage(cfg.storage_path)  # reachable, and it keeps the bytes written
        check_shards(cfg)
        run = run_location(cfg.run_dir)  # resolved after the check: a client with its settings
        check_run_files(run)
        if cfg.init_from and not resolve(cfg.init_from).exists():
            raise FileNotFoundError(f"init_from: {cfg.init_from}: no such checkpoint or run directory")
        summary = read_summary(run)
    except (ValueError, FileNotFoundError, StorageError) as err:
        raise SystemExit(f"error: {err}") from None
    if store.applied:
        print(store.line())
        import ray

        if ray.is_initialized():  # its workers were started without the settings: their uploads would be changed
            raise SystemExit(f"error: {cfg.storage_path}: the store needs {settings_line()} in every Ray process, "
                             "and Ray was started before this check; export both, then start Ray")
    print("config: " + json.dumps(cfg.to_dict()))
    if summary is not None and cfg.epochs <= summary["epochs"]:
        print(f"run {cfg.name} already finished {summary['epochs']} epochs (raise --set epochs=N to continue it; "
              f"delete {run} or pick another --set name=... to train again)")
        print_summary(summary, cfg.run_dir)
        return 0
    if summary is not None:  # a finished run with more epochs asked: it continues from its last checkpoint
        print(continue_line(cfg, summary["epochs"]))
        (run / SUMMARY).delete()  # the run trains again; its summary comes at the new end

    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    start_ray()
    trainer = TorchTrainer(
        functools.partial(train_worker, callbacks=tuple(callbacks)),
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
