"""The bench's end-to-end figure: the share of a training step spent waiting for data.

Trains AlexNet (default `alexnet-bn`, a small crop so that a CPU machine runs it in seconds)
for a few steps with one loader and times, per step, the wait for the next batch against the
whole step. It lives in orchestration because it is the one stage that may import both the
pipeline and the model; `python -m pipeline.bench` runs it as a child process
(`python -m orchestration.bench_e2e --spec JSON`) and reads one JSON line per loader back.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from model import build_model
from pipeline import make_loader
from pipeline.bench.figures import figure


def data_wait(shards_dir: str, loader_kwargs: dict, model_name: str, num_classes: int,
              steps: int, warmup: int, windows: int, device: str = "cpu") -> dict:
    """Train `steps` timed steps (after `warmup` untimed ones) and return the data-wait share
    (the wait for the next batch over the whole step) per window of steps, as a figure, and
    overall; the step time and the images/s of the whole loop."""
    torch.manual_seed(0)
    loader = make_loader(shards_dir, split="train", **loader_kwargs)
    model = build_model(model_name, num_classes=num_classes).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    it = iter(loader)
    waits, totals, images = [], [], 0
    for step in range(warmup + steps):
        start = time.perf_counter()
        try:
            x, y = next(it)[:2]
        except StopIteration:  # a new epoch; its restart is part of what the loader costs
            it = iter(loader)
            x, y = next(it)[:2]
        got = time.perf_counter()
        loss = loss_fn(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        if step >= warmup:
            waits.append(got - start)
            totals.append(end - start)
            images += int(x.shape[0])
    del it, loader
    cuts = [round(k * steps / windows) for k in range(windows + 1)]
    shares = [sum(waits[a:b]) / sum(totals[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
    return {
        "data_wait_share": {**figure(shares, unit="fraction"), "overall": round(sum(waits) / sum(totals), 4)},
        "step_s": figure(totals, unit="s"),
        "images_per_s": round(images / sum(totals), 2),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True,
                        help="JSON: shards_dir, model, num_classes, steps, warmup, windows, "
                             "loaders ({name: {device, make_loader kwargs}})")
    spec = json.loads(parser.parse_args(argv).spec)
    for name, kwargs in spec["loaders"].items():
        result = data_wait(spec["shards_dir"], kwargs, spec["model"], spec["num_classes"], spec["steps"],
                           spec["warmup"], spec["windows"], "cuda" if kwargs["device"] == "cuda" else "cpu")
        print("BENCH_E2E " + json.dumps({"name": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
