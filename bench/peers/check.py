"""So that nobody wins by doing less: every loader runs one whole epoch of each split in its
own process (`bench.peers.child check`), which counts its samples and batches and keeps its
first val tensors with their keys; here those are set against the PIL reference (the torch
baseline's val chain, with this process's plain Pillow, on the same JPEG bytes, found by key).
The difference is the mean absolute difference in 0..255 pixel levels (the normalised
difference times the stats' std x 255), per loader, over the kept samples."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.peers.tars import read_samples
from bench.peers.transforms import pil_chain
from pipeline.stats import read_stats


def run_check(name: str, spec: dict, pythonpath: str, out: Path, keep: int, log: Path,
              timeout: float = 900) -> dict:
    """One epoch of `spec` in a child; its counts, shapes and dtypes (the tensors go to `out`)."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    with Path(log).open("ab") as err:
        proc = subprocess.run([sys.executable, "-m", "bench.peers.child", "check", json.dumps(spec), str(out),
                               str(keep)], stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = Path(log).read_text(errors="replace")[-1500:]
        raise RuntimeError(f"peer {name}: the {spec['split']} check failed (exit {proc.returncode}); {log}:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mad_against_pil(npz: Path, shards_dir: Path, split: str, crop: int) -> dict:
    """Mean absolute difference of the kept tensors from the PIL reference, in pixel levels."""
    saved = np.load(npz)
    images, keys = saved["images"], [str(k) for k in saved["keys"]]
    stats = read_stats(shards_dir)
    chain = pil_chain(split, crop, stats)
    samples = read_samples(shards_dir, split, set(keys))
    scale = np.array(stats.std, np.float32).reshape(3, 1, 1) * 255
    diffs = []
    for key, tensor in zip(keys, images):
        img = Image.open(io.BytesIO(samples[key][0])).convert("RGB")
        ref = chain(img, np.random.default_rng(0))
        diffs.append(float(np.mean(np.abs(tensor - ref) * scale)))
    return {"samples": len(diffs), "mad_pixel_levels": round(float(np.mean(diffs)), 3) if diffs else None,
            "max_per_image": round(max(diffs), 3) if diffs else None}


def same_counts(checks: dict[str, dict[str, dict]]) -> dict:
    """{split: {"samples": {loader: n}, "same": bool}} over the loaders checked."""
    out = {}
    for split in ("train", "val"):
        counts = {name: c[split]["samples"] for name, c in checks.items() if split in c}
        out[split] = {"samples": counts, "same": len(set(counts.values())) == 1}
    return out
