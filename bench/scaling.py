"""How far AlexNet training scales: images/s against GPUs (1-64), the limit at each point.

`python -m bench.scaling [--quick] [--out runs/scaling] [--manifest PATH]`

What it measures on this machine (no GPU needed):
- the all-reduce of AlexNet's gradients (`build_model("alexnet", 1000)`: 60,965,224 fp32
  numbers, 244 MB) with torch.distributed gloo between 2 processes on loopback, in fp32 and
  in bf16, and a DDP training step in those 2 processes with and without DDP's
  `bf16_compress_hook` (gradients cast to bf16 for the all-reduce, back to fp32 after);
- the JPEG decode rate of one core (PIL, libjpeg-turbo) on JPEGs the packer itself stores
  (`shards.encode.encode` at shorter side 256, q90, from `bench.corpus` images), and
  their mean size in bytes (or the mean `nbytes` of a real `manifest.parquet`, `--manifest`);
- the CPU training step time per image (fwd + bwd + SGD, fp32, crop 224, one core per
  process), from the same 2 processes running the step without DDP.

What it states (no GPU has been measured by this project yet; `ASSUMPTIONS` names each with
its source): per-GPU training and decode rates of H100/H200, NVLink and network bandwidths.
It combines both into a model of one training step per GPU:

    step = max(fwd + max(bwd, allreduce), batch / decode_rate)
    allreduce = 2 (n-1)/n x gradient bytes / link bandwidth + 2 (n-1) x buckets x latency

(ring all-reduce; the link is NVLink within a node and the node's network beyond one; DDP
overlaps the all-reduce with the backward pass only). It writes `scaling.json`, `scaling.png`
and `scaling.md` under `--out` and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 train images
IMAGENET_VAL = 50_000
GPUS = (1, 2, 4, 8, 16, 32, 64)
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb=25


@dataclass(frozen=True)
class Gpu:
    """Stated per-GPU figures; every number has its source in `source`."""

    name: str
    bf16_dense_tflops: float
    nvlink_gb_s: float  # per direction, per GPU
    decode_images_per_s: float  # DALI `mixed` decoder, ImageNet stored at shorter side 256
    source: str


GPU_SPECS = {
    "h100": Gpu("H100 SXM", 989.0, 450.0, 12_000.0,
                "NVIDIA H100 datasheet: 989 TFLOPS dense BF16 (1,979 with sparsity), NVLink 900 GB/s "
                "(both directions), 7 NVJPG JPEG decoders. Decode: assumption derived from NVIDIA's "
                "blog 'Loading Data Fast with DALI and the New Hardware JPEG Decoder in NVIDIA A100 "
                "GPUs' (~7,000 images/s on one A100, full-size ImageNet, hw_decoder_load 0.75; quoted "
                "in NVIDIA/DALI issue 5362) x 1.7 for the ~0.45x pixels of shards stored at shorter "
                "side 256; no credit taken for H100's extra JPEG engines."),
    "h200": Gpu("H200 SXM", 989.0, 450.0, 12_000.0,
                "NVIDIA H200 datasheet: the H100's tensor throughput (989 TFLOPS dense BF16) and "
                "NVLink (900 GB/s), more and faster memory (141 GB HBM3e, 4.8 TB/s against 3.35). "
                "In this model an H200 is the H100 (AlexNet at batch 256 is not memory-bound in the "
                "model); decode: the H100's assumption."),
}

# Named assumptions of the model (override with the options of the same name).
ASSUMPTIONS = {
    "mfu": (0.12, "share of the GPU's dense BF16 peak that AlexNet training reaches (bf16 autocast, "
                  "channels_last, batch 256): an assumption, not a measurement; 0.12 gives ~27,000 "
                  "images/s on an H100. Training FLOPs per image = 6 x MACs (fwd 2 x MACs, bwd twice "
                  "the fwd), MACs counted by model.summary at crop 224."),
    "batch_size": (256, "per-GPU batch of configs/imagenet-fast.yaml"),
    "gpus_per_node": (8, "p4d.24xlarge / p5.48xlarge / p5en.48xlarge (orchestration/cluster/aws.yaml)"),
    "link_efficiency": (0.8, "share of a link's nominal bandwidth that NCCL's ring all-reduce reaches "
                             "(bus bandwidth); an assumption"),
    "latency_s": (10e-6, "fixed cost of one ring step per bucket (NCCL over NVLink ~5 us, over the "
                         "network ~10-20 us); an assumption"),
    "hw_decoder_load": (0.75, "share of the JPEGs DALI sends to the hardware decoder (the A100 blog's "
                              "best setting); the rest is decoded by nvJPEG's hybrid path, whose "
                              "Huffman stage runs on CPU threads"),
    "cpu_cores_per_gpu": (12, "physical cores per GPU on p5.48xlarge (192 vCPUs = 96 cores / 8 GPUs); "
                              "p4d.24xlarge has 6"),
}

# Node networks (per node, nominal). NVLink is the GPU's own figure.
NETWORKS = {
    "100G": (100.0, "100 Gb/s per node: plain ENA/TCP (sockets transport)"),
    "400G": (400.0, "400 Gb/s per node: p4d.24xlarge EFA (4 x 100 Gb/s)"),
    "3200G": (3200.0, "3200 Gb/s per node: p5.48xlarge EFA (400 Gb/s per GPU)"),
}
# The table's scenarios: (network, gradient dtype on the wire)
SCENARIOS = (("100G", "fp32"), ("100G", "bf16"), ("400G", "fp32"), ("400G", "bf16"), ("3200G", "fp32"))

LIMITS = ("compute (GPU)", "decode (GPU)", "all-reduce (NVLink)", "all-reduce (network)")


# ---------------------------------------------------------------- measurements
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, opts: dict, out) -> None:
    """One of the 2 gloo processes: all-reduce of the gradients' size (fp32, bf16), then DDP
    steps without and with bf16_compress_hook. Rank 0 puts its timings on `out`."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from model import build_model
    from model.summary import summarize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    marks = [("start", time.perf_counter())]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    marks.append(("init_process_group", time.perf_counter()))
    try:
        model = build_model(opts["model"], 1000)  # seeded alike on both ranks: the same weights
        numel = sum(p.numel() for p in model.parameters())
        marks.append(("build_model", time.perf_counter()))
        result = {"params": numel, "world_size": world, "threads_per_process": opts["threads"],
                  "macs": sum(r.macs for r in summarize(model, 224)) if rank == 0 else 0}
        # the whole gradient as one flat tensor, fp32 and bf16 taking turns (a busy machine
        # slows both alike); the first round is a warm-up (buffers, connections)
        flats = {"fp32": torch.ones(numel), "bf16": torch.ones(numel, dtype=torch.bfloat16)}
        runs = {key: [] for key in flats}
        for i in range(opts["reps"] + 1):
            for key, flat in flats.items():
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(flat)
                if i:
                    runs[key].append(time.perf_counter() - t0)
        for key in flats:
            result[f"allreduce_{key}_s"] = runs[key]
        del flats
        marks.append(("allreduce", time.perf_counter()))
        # training steps: "local" is the step without DDP (no all-reduce), on both ranks at once,
        # so that ddp - local is the all-reduce time the step does not hide; "none" is DDP as
        # train.py runs it; "bf16_compress_hook" casts each bucket to bf16 for the all-reduce.
        # A copy of the module per variant (a module under two DDP wrappers would be reduced
        # twice); init_sync=False: both ranks already hold the same weights.
        images = torch.randn(opts["batch"], 3, opts["crop"], opts["crop"])
        labels = torch.randint(0, 1000, (opts["batch"],))
        nets = {"local": copy.deepcopy(model), "none": DDP(copy.deepcopy(model), init_sync=False),
                "bf16_compress_hook": DDP(copy.deepcopy(model), init_sync=False)}
        # DDP refuses a hook *named* bf16_compress_hook without CUDA + NCCL; the hook itself (cast
        # the bucket to bf16, all_reduce, cast back, divide by the world size) runs on gloo:
        # register it through a wrapper
        nets["bf16_compress_hook"].register_comm_hook(None, lambda state, bucket: bf16_compress_hook(state, bucket))
        opts_ = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for k, n in nets.items()}
        runs = {k: [] for k in nets}
        marks.append(("wrap", time.perf_counter()))
        for i in range(opts["steps"] + 1):  # variants take turns; round 0 is a warm-up
            for key, net in nets.items():
                dist.barrier()
                t0 = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(net(images), labels)
                opts_[key].zero_grad(set_to_none=True)
                loss.backward()  # DDP all-reduces the gradient buckets during backward
                opts_[key].step()
                if i:
                    runs[key].append(time.perf_counter() - t0)
        for key in nets:
            result[f"ddp_step_{key}_s"] = runs[key]
        marks.append(("steps", time.perf_counter()))
        result["phases"] = {name: t - prev for (_, prev), (name, t) in zip(marks, marks[1:])}
        if rank == 0:
            out.put(result)
    finally:
        dist.destroy_process_group()


def measure_gloo(model: str, crop: int, batch: int, reps: int, steps: int, timeout_s: float = 600) -> dict:
    """All-reduce and DDP step times between 2 gloo processes on loopback (1 thread each)."""
    # fork: the children inherit the imported modules instead of importing them again (seconds
    # each on a busy machine); importing starts none of torch's thread pools
    for name in ("torch.distributed.algorithms.ddp_comm_hooks.default_hooks", "torch.nn.parallel",
                 "model.registry", "model.summary"):
        importlib.import_module(name)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = _free_port()
    opts = {"model": model, "crop": crop, "batch": batch, "reps": reps, "steps": steps, "threads": 1}
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, opts, out)) for r in range(2)]
    for p in procs:
        p.start()
    result, deadline = None, time.monotonic() + timeout_s
    try:
        while result is None:
            try:
                result = out.get(timeout=1)
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"the gloo measurement failed (exit codes {failed}; see the "
                                       f"traceback above) or passed {timeout_s:.0f} s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a gloo process failed (exit codes {[p.exitcode for p in procs]})")
    grad_bytes = result["params"] * 4
    med = {k: statistics.median(v) for k, v in result.items() if k.endswith("_s")}
    ring = 2 * (2 - 1) / 2
    return {
        **result,
        "crop": crop, "batch": batch,
        "grad_bytes_fp32": grad_bytes,
        "allreduce_fp32_s_median": med["allreduce_fp32_s"],
        "allreduce_bf16_s_median": med["allreduce_bf16_s"],
        "ddp_step_fp32_s_median": med["ddp_step_none_s"],
        "ddp_step_bf16_hook_s_median": med["ddp_step_bf16_compress_hook_s"],
        "local_step_s_median": med["ddp_step_local_s"],
        "exposed_allreduce_fp32_s": med["ddp_step_none_s"] - med["ddp_step_local_s"],
        "exposed_allreduce_bf16_hook_s": med["ddp_step_bf16_compress_hook_s"] - med["ddp_step_local_s"],
        # what the loopback ring moved per second (NCCL's "bus bandwidth" definition)
        "busbw_fp32_gb_s": ring * grad_bytes / med["allreduce_fp32_s"] / 1e9,
        "busbw_bf16_gb_s": ring * grad_bytes / 2 / med["allreduce_bf16_s"] / 1e9,
    }


def _corpus_jpegs(count: int) -> list[bytes]:
    """`count` ImageNet-like JPEGs (bench.corpus) stored as the packer stores them:
    `shards.encode.encode` at shorter side 256, quality 90."""
    from bench.corpus import synth_image
    from shards.encode import encode

    blobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            src = Path(tmp) / f"{i}.JPEG"
            synth_image(i, seed=0).save(src, "JPEG", quality=90)
            enc = encode(str(src), f"s{i}", shorter_side=256, quality=90, want_stats=False)
            if isinstance(enc, str):
                raise RuntimeError(f"corpus image {i}: {enc}")
            blobs.append(enc.jpeg)
    return blobs


def manifest_bytes_per_image(path: str) -> float:
    """Mean stored JPEG size of the train split of a shard set's manifest.parquet."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["split", "nbytes"])
    train = table.filter(pc.equal(table["split"], "train"))
    table = train if train.num_rows else table
    return float(pc.mean(table["nbytes"]).as_py())


def measure_decode(count: int, passes: int) -> dict:
    """PIL decode images/s of one core (one thread) on the generated corpus, and its bytes per image."""
    from bench.decode import pil_decode

    blobs = _corpus_jpegs(count)
    pil_decode(blobs[:4])  # warm code paths
    runs = []
    for _ in range(passes):
        t0 = time.perf_counter()
        pil_decode(blobs)
        runs.append(len(blobs) / (time.perf_counter() - t0))
    return {"images": len(blobs), "passes": passes, "decode_per_core_images_per_s": statistics.median(runs),
            "runs": runs, "bytes_per_image": sum(map(len, blobs)) / len(blobs),
            "decoder": "PIL (libjpeg-turbo), 1 thread, full decode to RGB"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- the model
def allreduce_s(n: int, grad_bytes: float, link_gb_s: float, latency_s: float) -> float:
    """Ring all-reduce of `grad_bytes` over n ranks: 2(n-1)/n x bytes / bandwidth + latency per
    ring step and bucket."""
    if n <= 1:
        return 0.0
    buckets = math.ceil(grad_bytes / BUCKET_BYTES)
    return 2 * (n - 1) / n * grad_bytes / (link_gb_s * 1e9) + 2 * (n - 1) * buckets * latency_s


def predict(n: int, *, gpu: Gpu, network: str, grad_dtype: str, params: int, macs: int, a: dict) -> dict:
    """One point of the model: images/s of n GPUs and what limits them."""
    g = a["gpus_per_node"]
    nodes = math.ceil(n / g)
    batch = a["batch_size"]
    compute_rate = gpu.bf16_dense_tflops * 1e12 * a["mfu"] / (6 * macs)
    t_compute = batch / compute_rate
    t_fwd, t_bwd = t_compute / 3, 2 * t_compute / 3
    grad_bytes = params * (2 if grad_dtype == "bf16" else 4)
    if nodes == 1:
        link, link_name = gpu.nvlink_gb_s * a["link_efficiency"], "all-reduce (NVLink)"
    else:  # the ring crosses every node's network once each way: the node's NICs carry it
        link = min(gpu.nvlink_gb_s, NETWORKS[network][0] / 8) * a["link_efficiency"]
        link_name = "all-reduce (network)"
    t_comm = allreduce_s(n, grad_bytes, link, a["latency_s"])
    t_train = t_fwd + max(t_bwd, t_comm)
    t_decode = batch / gpu.decode_images_per_s
    step = max(t_train, t_decode)
    if t_decode >= t_train:
        limit = "decode (GPU)"
    else:
        limit = link_name if t_comm > t_bwd else "compute (GPU)"
    per_gpu = batch / step
    return {
        "gpus": n, "nodes": nodes, "network": network, "grad_dtype": grad_dtype, "gpu": gpu.name,
        "images_per_s": n * per_gpu, "images_per_s_per_gpu": per_gpu, "limit": limit,
        "step_s": step, "compute_s": t_compute, "allreduce_s": t_comm, "decode_s": t_decode,
        "scaling_efficiency": per_gpu / min(compute_rate, gpu.decode_images_per_s),
    }


def sizing(rows: list[dict], bytes_per_image: float, decode_per_core: float, a: dict) -> dict:
    """The sizing rules with this run's figures: CPU cores per GPU for decoding, network per GPU
    for streaming shards, disk per node for staging them."""
    best = max(r["images_per_s_per_gpu"] for r in rows)
    g = a["gpus_per_node"]
    return {
        "bytes_per_image": bytes_per_image,
        "max_images_per_s_per_gpu": best,
        # the CPU decodes the (1 - hw_decoder_load) share in DALI's hybrid path; all of it on CPU
        "cpu_cores_per_gpu_all_cpu_decode": best / decode_per_core,
        "cpu_cores_per_gpu_mixed_decode_upper_bound": best * (1 - a["hw_decoder_load"]) / decode_per_core,
        "cpu_decode_images_per_s_per_gpu": a["cpu_cores_per_gpu"] * decode_per_core,
        "network_mb_s_per_gpu": best * bytes_per_image / 1e6,
        "network_gbit_s_per_node": best * bytes_per_image * g * 8 / 1e9,
        "disk_gb_per_node_whole_train_set": bytes_per_image * IMAGENET_TRAIN / 1e9,
        "disk_gb_per_node_train_and_val": bytes_per_image * (IMAGENET_TRAIN + IMAGENET_VAL) / 1e9,
    }


def build_table(gpu: Gpu, params: int, macs: int, a: dict) -> list[dict]:
    return [predict(n, gpu=gpu, network=net, grad_dtype=dt, params=params, macs=macs, a=a)
            for net, dt in SCENARIOS for n in GPUS]


# ---------------------------------------------------------------- outputs
def _cell(row: dict) -> str:
    return f"{row['images_per_s']:,.0f} ({row['limit']})"


def markdown(result: dict) -> str:
    rows, m, s = result["rows"], result["measured"], result["sizing"]
    by = {(r["network"], r["grad_dtype"], r["gpus"]): r for r in rows}
    head = [f"{net} {dt}" for net, dt in SCENARIOS]
    lines = [f"`python -m bench.scaling{' --quick' if result['quick'] else ''}`, {result['when']}: "
             f"model for {result['gpu']['name']}, batch {result['assumptions']['batch_size']} per GPU, "
             f"{result['params']:,} parameters, {result['macs']:,} MACs per image at 224.", "",
             "images/s (limit) by node network and gradient dtype on the wire:", "",
             "| GPUs | nodes | " + " | ".join(head) + " |", "|---:|---:|" + "---:|" * len(head)]
    for n in GPUS:
        cells = [_cell(by[(net, dt, n)]) for net, dt in SCENARIOS]
        lines.append(f"| {n} | {math.ceil(n / result['assumptions']['gpus_per_node'])} | " + " | ".join(cells) + " |")
    ar, g = m["gloo"], m["gloo"]
    lines += ["", "Measured on this machine "
              f"({result['machine']['cpus']} CPUs, {result['machine']['processor']}; load average "
              f"{result['machine']['load_average_before'][0]:.1f} before, "
              f"{result['machine']['load_average_after'][0]:.1f} after):", "",
              "| figure | value |", "|---|---:|",
              f"| all-reduce of {ar['grad_bytes_fp32'] / 1e6:.0f} MB fp32 gradients, gloo, 2 processes, loopback "
              f"| {ar['allreduce_fp32_s_median']:.3f} s ({ar['busbw_fp32_gb_s']:.2f} GB/s bus bandwidth) |",
              f"| the same in bf16 ({ar['grad_bytes_fp32'] / 2e6:.0f} MB) | {ar['allreduce_bf16_s_median']:.3f} s |",
              f"| DDP step, 2 gloo processes, batch {g['batch']} x crop {g['crop']}, fp32 all-reduce "
              f"| {g['ddp_step_fp32_s_median']:.3f} s |",
              f"| the same with `bf16_compress_hook` | {g['ddp_step_bf16_hook_s_median']:.3f} s |",
              f"| the same step without DDP (both processes at once) | {g['local_step_s_median']:.3f} s |",
              f"| JPEG decode, 1 core (PIL), stored at shorter side 256 | "
              f"{m['decode']['decode_per_core_images_per_s']:,.0f} images/s |",
              f"| stored bytes per image ({m['bytes_per_image_source']}) | {s['bytes_per_image'] / 1e3:.1f} KB |",
              f"| CPU training step per image (fp32, crop {m['cpu_step']['crop']}, batch {m['cpu_step']['batch']}, "
              f"1 thread per process, 2 processes at once) | {m['cpu_step']['s_per_image'] * 1e3:.0f} ms "
              f"({m['cpu_step']['images_per_s_per_core']:.1f} images/s per core) |",
              "", "Sizing at the best per-GPU rate of the table "
              f"({s['max_images_per_s_per_gpu']:,.0f} images/s per GPU):", "",
              "| rule | value |", "|---|---:|",
              f"| CPU cores per GPU if DALI decoded on the CPU | {s['cpu_cores_per_gpu_all_cpu_decode']:.1f} |",
              f"| CPU cores per GPU for DALI `mixed` (hw_decoder_load "
              f"{result['assumptions']['hw_decoder_load']}), upper bound | "
              f"{s['cpu_cores_per_gpu_mixed_decode_upper_bound']:.1f} |",
              f"| network per GPU streaming shards (bytes/image x images/s) | {s['network_mb_s_per_gpu']:.0f} MB/s |",
              f"| network per node ({result['assumptions']['gpus_per_node']} GPUs) | "
              f"{s['network_gbit_s_per_node']:.1f} Gb/s |",
              f"| disk per node to stage the whole train set (bytes/image x {IMAGENET_TRAIN:,}) | "
              f"{s['disk_gb_per_node_whole_train_set']:.0f} GB |",
              f"| ... train + val | {s['disk_gb_per_node_train_and_val']:.0f} GB |"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Left: images/s against GPUs (log-log), the limit as the marker. Right: images/s per GPU,
    with the two stated per-GPU ceilings (compute at the assumed MFU, decode) as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"compute (GPU)": "o", "decode (GPU)": "D", "all-reduce (NVLink)": "s", "all-reduce (network)": "v"}
    styles = ("-", "--", "-.", ":", (0, (5, 1)))
    rows, a = result["rows"], result["assumptions"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.8))
    ax.plot(GPUS, [n * rows[0]["images_per_s_per_gpu"] for n in GPUS], color="0.75", lw=6, alpha=0.5,
            label="linear from 1 GPU")
    for (net, dt), ls, lw in zip(SCENARIOS, styles, (3.5, 3, 2.5, 2, 1.5)):
        pts = [r for r in rows if r["network"] == net and r["grad_dtype"] == dt]
        x = [r["gpus"] for r in pts]
        label = f"{net}/node, {dt} gradients"
        line, = ax.plot(x, [r["images_per_s"] for r in pts], ls=ls, lw=lw, label=label)
        ax2.plot(x, [r["images_per_s_per_gpu"] for r in pts], ls=ls, lw=lw, color=line.get_color(), label=label)
        for r in pts:
            for axis, key in ((ax, "images_per_s"), (ax2, "images_per_s_per_gpu")):
                axis.scatter(r["gpus"], r[key], marker=markers[r["limit"]], color=line.get_color(), zorder=3, s=28)
    for limit, mk in markers.items():
        ax.scatter([], [], marker=mk, color="k", label=f"limit: {limit}")
    gpu = result["gpu"]
    compute = gpu["bf16_dense_tflops"] * 1e12 * a["mfu"] / (6 * result["macs"])
    ax2.axhline(compute, color="k", lw=1, ls=":", label=f"compute ceiling (MFU {a['mfu']}): {compute:,.0f}")
    ax2.axhline(gpu["decode_images_per_s"], color="k", lw=1, ls="--",
                label=f"decode ceiling (assumed): {gpu['decode_images_per_s']:,.0f}")
    for axis in (ax, ax2):
        axis.set_xscale("log", base=2)
        axis.set_xticks(GPUS, [str(n) for n in GPUS])
        axis.set_xlabel(f"GPUs ({gpu['name']}, {a['gpus_per_node']} per node)")
        axis.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("training images/s (model)")
    ax2.set_ylabel("training images/s per GPU (model)")
    ax2.set_ylim(0, compute * 1.1)
    ax.legend(fontsize=7.5, loc="upper left")
    ax2.legend(fontsize=7.5, loc="lower left")
    fig.suptitle(f"AlexNet ({result['model']}) data-parallel scaling, batch {a['batch_size']} per GPU: stated GPU "
                 f"figures + ring all-reduce model (measured CPU figures: scaling.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and a smaller corpus (CI, < 1 min)")
    p.add_argument("--out", default="runs/scaling", help="folder for scaling.json, scaling.png, scaling.md")
    p.add_argument("--gpu", choices=sorted(GPU_SPECS), default="h100")
    p.add_argument("--model", default="alexnet", help="model whose gradients and MACs are used")
    p.add_argument("--manifest", help="a shard set's manifest.parquet: bytes per image from it (train rows)")
    for key, (value, _) in ASSUMPTIONS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, help=f"(default {value})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a = {k: getattr(args, k) for k in ASSUMPTIONS}
    q = args.quick
    load_before = os.getloadavg()
    phases = {}
    print("measuring: all-reduce and DDP steps, 2 gloo processes on loopback ...", flush=True)
    t = time.perf_counter()
    gloo = measure_gloo(args.model, crop=224, batch=2 if q else 16, reps=1 if q else 6, steps=1 if q else 4)
    phases["gloo"] = time.perf_counter() - t
    print("measuring: JPEG decode per core ...", flush=True)
    t = time.perf_counter()
    decode = measure_decode(count=16 if q else 256, passes=3 if q else 5)
    phases["decode"] = time.perf_counter() - t
    params, macs = gloo["params"], gloo["macs"]
    # the CPU training step per image: the step without DDP, one per core, both cores busy
    cpu = {"crop": gloo["crop"], "batch": gloo["batch"], "threads": 1, "processes": 2,
           "s_per_image": gloo["local_step_s_median"] / gloo["batch"],
           "images_per_s_per_core": gloo["batch"] / gloo["local_step_s_median"]}
    if args.manifest:
        bytes_per_image, source = manifest_bytes_per_image(args.manifest), args.manifest
    else:
        bytes_per_image, source = decode["bytes_per_image"], f"{decode['images']} generated JPEGs, packer's encode"
    gpu = GPU_SPECS[args.gpu]
    rows = build_table(gpu, params, macs, a)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": q, "model": args.model,
        "params": params, "macs": macs,
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_name(), "python": sys.version.split()[0],
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "phase_s": phases,
        "gpu": asdict(gpu), "gpus_stated": {k: asdict(v) for k, v in GPU_SPECS.items()},
        "networks": {k: {"gbit_s": v[0], "source": v[1]} for k, v in NETWORKS.items()},
        "assumptions": a, "assumption_sources": {k: v[1] for k, v in ASSUMPTIONS.items()},
        "measured": {"gloo": gloo, "decode": decode, "cpu_step": cpu, "bytes_per_image_source": source},
        "rows": rows,
        "sizing": sizing(rows, bytes_per_image, decode["decode_per_core_images_per_s"], a),
    }
    # the bf16 hook in the model: the same table with bf16 on the wire is in `rows`; measured:
    result["bf16_hook_effect"] = {
        "measured_ddp_step_ratio": gloo["ddp_step_bf16_hook_s_median"] / gloo["ddp_step_fp32_s_median"],
        "measured_allreduce_ratio": gloo["allreduce_bf16_s_median"] / gloo["allreduce_fp32_s_median"],
        "model_images_per_s_ratio_at_64_gpus": {
            net: next(r for r in rows if r["network"] == net and r["grad_dtype"] == "bf16" and r["gpus"] == 64)
            ["images_per_s"] / next(r for r in rows if r["network"] == net and r["grad_dtype"] == "fp32"
                                    and r["gpus"] == 64)["images_per_s"]
            for net in ("100G", "400G")},
    }
    text = markdown(result)
    result["wall_s"] = time.perf_counter() - t0
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    (out / "scaling.md").write_text(text)
    plot(result, out / "scaling.png")
    print(text)
    print(f"wrote {out / 'scaling.json'}, {out / 'scaling.png'}, {out / 'scaling.md'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
