"""`python -m bench.scaling`: the quick mode end to end (2 real gloo processes on
loopback, real JPEG decoding, the model, the JSON/PNG/Markdown outputs), and the model's
arithmetic on its own."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import scaling

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path, float]:
    out = tmp_path_factory.mktemp("scaling")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.scaling", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| GPUs | nodes |" in proc.stdout  # the table is printed
    return json.loads((out / "scaling.json").read_text()), out, wall


def test_quick_outputs(quick_run):
    result, out, wall = quick_run
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "scaling.md").read_text()
    for n in scaling.GPUS:
        assert f"\n| {n} | {math.ceil(n / 8)} | " in md
    assert result["quick"] is True
    # 2 cores shared with other jobs: about 20 s when they are light, up to ~60 s at load 8
    print(f"quick run: {wall:.0f} s wall, {result['wall_s']:.0f} s inside; load {result['machine']}")


def test_measured_figures(quick_run):
    m = quick_run[0]["measured"]
    g = m["gloo"]
    assert g["params"] == 60_965_224 and g["grad_bytes_fp32"] == 4 * 60_965_224  # AlexNet, 244 MB
    assert g["world_size"] == 2
    assert g["allreduce_fp32_s_median"] > 0 and g["allreduce_bf16_s_median"] > 0
    assert g["ddp_step_fp32_s_median"] > 0 and g["ddp_step_bf16_hook_s_median"] > 0 and g["local_step_s_median"] > 0
    assert quick_run[0]["macs"] == 724_406_816  # README's MACs per image at 224
    assert m["decode"]["decode_per_core_images_per_s"] > 0
    assert 10_000 < quick_run[0]["sizing"]["bytes_per_image"] < 200_000  # a JPEG at shorter side 256
    assert m["cpu_step"]["s_per_image"] > 0


def test_every_row_has_a_limit_and_per_gpu_rate_never_grows(quick_run):
    rows = quick_run[0]["rows"]
    assert len(rows) == len(scaling.SCENARIOS) * len(scaling.GPUS)
    for row in rows:
        assert row["limit"] in scaling.LIMITS
        assert row["images_per_s"] > 0
    for net, dtype in scaling.SCENARIOS:
        line = sorted((r for r in rows if r["network"] == net and r["grad_dtype"] == dtype), key=lambda r: r["gpus"])
        assert [r["gpus"] for r in line] == list(scaling.GPUS)
        per_gpu = [r["images_per_s_per_gpu"] for r in line]
        assert all(b <= a * (1 + 1e-12) for a, b in zip(per_gpu, per_gpu[1:])), (net, dtype, per_gpu)
        # across the node boundary (8 -> 16 GPUs) the link changes from NVLink to the network
        eight, sixteen = line[3], line[4]
        assert (eight["nodes"], sixteen["nodes"]) == (1, 2)
        assert sixteen["allreduce_s"] > eight["allreduce_s"]


def test_bf16_on_the_wire_helps_where_the_network_limits(quick_run):
    rows = {(r["network"], r["grad_dtype"], r["gpus"]): r for r in quick_run[0]["rows"]}
    fp32, bf16 = rows[("100G", "fp32", 64)], rows[("100G", "bf16", 64)]
    assert fp32["limit"] == "all-reduce (network)"
    assert bf16["images_per_s"] > fp32["images_per_s"]
    assert bf16["allreduce_s"] < fp32["allreduce_s"]


# ---------------------------------------------------------------- the arithmetic alone
def test_ring_allreduce_cost():
    size, bw = 244e6, 50.0  # bytes, GB/s
    assert scaling.allreduce_s(1, size, bw, latency_s=1e-5) == 0.0
    buckets = math.ceil(size / scaling.BUCKET_BYTES)
    assert scaling.allreduce_s(2, size, bw, 0.0) == pytest.approx(size / 50e9)  # 2(n-1)/n = 1
    assert scaling.allreduce_s(64, size, bw, 0.0) == pytest.approx(2 * 63 / 64 * size / 50e9)
    assert scaling.allreduce_s(4, size, bw, 1e-5) == pytest.approx(1.5 * size / 50e9 + 6 * buckets * 1e-5)


def test_limits_named_by_the_binding_resource():
    a = {k: v for k, (v, _) in scaling.ASSUMPTIONS.items()}
    params, macs = 60_965_224, 724_406_816
    fast_decode = scaling.Gpu("t", 989.0, 450.0, 1e9, "test")
    slow_decode = scaling.Gpu("t", 989.0, 450.0, 1_000.0, "test")
    one = scaling.predict(1, gpu=fast_decode, network="400G", grad_dtype="fp32", params=params, macs=macs, a=a)
    assert one["limit"] == "compute (GPU)" and one["allreduce_s"] == 0
    compute_rate = 989e12 * a["mfu"] / (6 * macs)
    assert one["images_per_s"] == pytest.approx(compute_rate)
    assert scaling.predict(8, gpu=slow_decode, network="400G", grad_dtype="fp32", params=params, macs=macs,
                           a=a)["limit"] == "decode (GPU)"
    far = scaling.predict(64, gpu=fast_decode, network="100G", grad_dtype="fp32", params=params, macs=macs, a=a)
    assert far["limit"] == "all-reduce (network)"
    # the step: forward, then the backward or the all-reduce, whichever is longer
    assert far["step_s"] == pytest.approx(far["compute_s"] / 3 + far["allreduce_s"])
