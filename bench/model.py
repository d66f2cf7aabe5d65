"""Forward+backward throughput of the model family on this machine.

`python -m bench.model [--models alexnet,alexnet-bn] [--crops 224,112,64] [--batch 16]
[--steps 2] [--rounds 3] [--json FILE]`

Every configuration (model x crop x fp32/bf16 x channels_last off/on) is timed once per
round, and rounds repeat the whole set, so load from other processes spreads over all
configurations alike; the table reports the median over rounds and each rate relative to
fp32 contiguous of the same model and crop. `step_seconds` is the benches' one forward+backward
timer (the GPU check's model step times with it too).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.alexnet import MIN_CROP
from model.registry import MODEL_NAMES, build_model


@dataclass(frozen=True)
class BenchConfig:
    model: str
    crop: int
    dtype: str  # "fp32" or "bf16" (autocast)
    channels_last: bool


def step_seconds(model: nn.Module, batch: int, crop: int, steps: int, dtype: str = "fp32",
                 channels_last: bool = False, device: str = "cpu", warmup: int = 1) -> float:
    """Seconds per forward+backward step of `model` on random images, after `warmup` untimed
    steps: the one forward+backward timer of the benches. `dtype` "bf16" autocasts to bfloat16
    on `device`; on CUDA the device is synchronised before the clock is read."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def one() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        one()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync()
    return (time.perf_counter() - start) / steps


def run(models: list[str], crops: list[int], batch: int, steps: int, rounds: int,
        dtypes: tuple[str, ...] = ("fp32", "bf16"), on_round: Callable[[list[dict]], None] | None = None) -> list[dict]:
    configs = [BenchConfig(m, c, d, cl) for m, c, d, cl in
               itertools.product(models, crops, dtypes, (False, True))]
    built: dict[tuple[str, bool], nn.Module] = {}
    for name, cl in itertools.product(models, (False, True)):
        torch.manual_seed(0)
        net = build_model(name).train()
        built[name, cl] = net.to(memory_format=torch.channels_last) if cl else net
    rates: dict[BenchConfig, list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        for cfg in configs:
            net = built[cfg.model, cfg.channels_last]
            rates[cfg].append(batch / step_seconds(net, batch, cfg.crop, steps, cfg.dtype, cfg.channels_last))
            print(f"  {cfg}: {rates[cfg][-1]:.1f} images/s", flush=True)
        print(f"round {r + 1}/{rounds} done", flush=True)
        if on_round is not None:
            on_round(_summarize(configs, rates))
    return _summarize(configs, rates)


def _summarize(configs: list[BenchConfig], rates: dict[BenchConfig, list[float]]) -> list[dict]:
    results = []
    for cfg in configs:
        base = BenchConfig(cfg.model, cfg.crop, "fp32", False)
        ratio = statistics.median(rates[cfg]) / statistics.median(rates[base]) if rates.get(base) else float("nan")
        results.append({**asdict(cfg), "images_per_s": statistics.median(rates[cfg]),
                        "all_rounds": rates[cfg], "vs_fp32_contiguous": ratio})
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | crop | dtype | channels_last | images/s (median) | vs fp32 contiguous |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['crop']} | {r['dtype']} | {'on' if r['channels_last'] else 'off'} "
                     f"| {r['images_per_s']:.1f} | {r['vs_fp32_contiguous']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="alexnet,alexnet-bn")
    parser.add_argument("--crops", default="224,112,64")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODEL_NAMES)}")
    try:
        crops = [int(c) for c in args.crops.split(",")]
    except ValueError:
        parser.error(f"--crops must be comma-separated integers, got {args.crops!r}")
    if min(crops) < MIN_CROP or args.batch < 1 or args.steps < 1 or args.rounds < 1:
        parser.error(f"need crops >= {MIN_CROP} and batch, steps, rounds >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}", flush=True)
    def write(results: list[dict]) -> None:  # after every round, so a cut-short run keeps its data
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    dtypes = tuple(args.dtypes.split(","))
    if not set(dtypes) <= {"fp32", "bf16"}:
        parser.error(f"--dtypes: choose from fp32,bf16, got {args.dtypes!r}")
    results = run(models, crops, args.batch, args.steps, args.rounds, dtypes, on_round=write)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
