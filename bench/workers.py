"""Measured scaling on this machine: the demo trained with 1, 2 and 3 CPU workers on a
one-node local cluster (3 logical CPUs on the machine's cores), and with 2 workers on a
2-node local cluster, one after another in one run, against what the scaling model predicts.

    python -m bench.workers [--epochs 2] [--out runs/bench-workers] [--shards data/shards]

Each case is `orchestration/train.py --config configs/demo.yaml` in a process of its own (a
Ray driver joining the local cluster, as a user's run does) with `workers`, `epochs`, a fresh
`name`, no step checkpoints and no ledger (what is timed is training); its `summary.json`
gives images/s and the data-wait share (epochs after the first). The model (`bench.scaling`'s
step, on this machine's cores): W CPU workers share the node's cores, so the compute rate
stays that of the 1-worker run, and every step adds the gloo all-reduce of the gradients,
measured here by `scaling.measure_gloo`:

    images/s(W) = W * B / (W * B / rate(1) + allreduce(W)),  allreduce(W) = allreduce(2) * (W-1)/W * 2

It writes `workers.json` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def train(cfg_path: Path, name: str, out: Path, workers: int, epochs: int, shards: str,
          env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "orchestration/train.py", "--config", str(cfg_path), "--set", f"name={name}",
           "--set", f"storage_path={out}", "--set", f"workers={workers}", "--set", f"epochs={epochs}",
           "--set", "checkpoint_every_steps=0", "--set", "audit_samples=false", "--set", f"shards_dir={shards}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env or os.environ.copy(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {name} failed:\n{(done.stdout + done.stderr)[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    return {"case": name, "workers": workers, "images_per_s": summary["images_per_s"],
            "data_wait": summary["data_wait"], "top1": summary["top1"], "wall_s": time.perf_counter() - t0}


def local_cluster(nodes: int, cpus_per_node: int) -> tuple[object, dict[str, str]]:
    """A 0-CPU head and `nodes` nodes of `cpus_per_node` logical CPUs on loopback
    (ray.cluster_utils.Cluster); the env of a driver that joins it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True,
                                      "dashboard_host": "127.0.0.1"})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    return cluster, {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def predict(rate1: float, batch: int, allreduce2_s: float, workers: int) -> float:
    if workers == 1:
        return rate1
    allreduce = allreduce2_s * 2 * (workers - 1) / workers
    return workers * batch / (workers * batch / rate1 + allreduce)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="runs/bench-workers")
    p.add_argument("--shards", default=str(ROOT / "data" / "shards"))
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = yaml.safe_load(Path(args.config).read_text())

    from bench.scaling import measure_gloo
    from model import build_model

    classes = len(json.loads((Path(args.shards) / "classes.json").read_text()))
    grad_bytes = 4 * sum(t.numel() for t in build_model(cfg["model"], num_classes=classes).parameters())
    gloo = measure_gloo(cfg["model"], cfg["crop_size"], cfg["batch_size"], reps=3, steps=1)
    allreduce2 = gloo["allreduce_fp32_s_median"] * grad_bytes / gloo["grad_bytes_fp32"]

    cluster, env = local_cluster(nodes=1, cpus_per_node=3)  # 3 workers must fit on one node
    try:
        rows = [train(Path(args.config), f"w{w}-{stamp}", out, w, args.epochs, args.shards, env) for w in (1, 2, 3)]
    finally:
        cluster.shutdown()
    cluster, env = local_cluster(nodes=2, cpus_per_node=1)
    try:
        rows.append(train(Path(args.config), f"nodes2-{stamp}", out, 2, args.epochs, args.shards, env))
    finally:
        cluster.shutdown()
    rows[-1]["case"] = "2 nodes x 1 worker"
    for row in rows:
        row["predicted_images_per_s"] = predict(rows[0]["images_per_s"], cfg["batch_size"], allreduce2,
                                                row["workers"])
    result = {"when": stamp, "epochs": args.epochs, "batch_size": cfg["batch_size"], "grad_bytes": grad_bytes,
              "allreduce_2_s": allreduce2, "cores": len(os.sched_getaffinity(0)), "rows": rows}
    (out / "workers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| case | workers | images/s | data-wait | model | measured / model | top-1 after {args.epochs} epochs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['workers']} | {r['images_per_s']:.1f} | {100 * r['data_wait']:.1f}% | "
              f"{r['predicted_images_per_s']:.1f} | {r['images_per_s'] / r['predicted_images_per_s']:.2f} | "
              f"{100 * r['top1']:.1f}% |")
    print(f"all-reduce of {grad_bytes / 1e6:.0f} MB over 2 gloo processes: {allreduce2:.3f} s; {out / 'workers.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
