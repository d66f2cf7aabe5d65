"""`python -m orchestration.predict RUN_DIR|CHECKPOINT PATH... [--topk K] [--json] [--shards DIR]`:
the top-k classes of images outside any shard set.

PATHs are image files (JPEG, PNG) or folders of them (searched recursively, in name order).
Each image goes through the val graph the network was evaluated with (`pipeline.dali.
files_pipeline`: shorter side to the crop's base side, centre crop, the shard set's
normalisation), batched through DALI; classes are named from the set's `classes.json`
(index, wnid, name). An input that cannot be read or decoded gets one line of its own and
the rest still run; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestration.artifacts import build_trained_model, load_trained
from shards.layouts import CLASSES_FILE, STATS_FILE
from shards.location import resolve

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_paths(paths: list[str]) -> Iterator[Path]:
    """The files named and the images under the folders named, in the order given."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def set_facts(shards_dir: str) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    """The classes (index, wnid, name) and the normalisation (mean, std in [0, 1]) of a set."""
    from pipeline.stats import IMAGENET_MEAN, IMAGENET_STD

    root = resolve(shards_dir)
    try:
        classes = (root / CLASSES_FILE).read_json("re-pack the set, or pass --shards DIR of the set the run trained on")
    except FileNotFoundError:
        raise FileNotFoundError(f"{root / CLASSES_FILE}: missing: the class names come from the shard set the run "
                                "trained on; pass --shards DIR (or URI) of that set") from None
    stats = (root / STATS_FILE).read_json("re-pack the set") if (root / STATS_FILE).is_file() else {}
    return classes, list(stats.get("mean", IMAGENET_MEAN)), list(stats.get("std", IMAGENET_STD))


def predict(state: dict[str, Any], blobs: list[bytes], mean: list[float], std: list[float],
            batch_size: int = 32) -> torch.Tensor:
    """Class probabilities [N, classes] of the encoded images `blobs` (all decodable)."""
    from orchestration.compute import autocast
    from orchestration.config import from_dict
    from pipeline import dali
    from pipeline.spec import base_side

    cfg = from_dict(state["config"], origin="the checkpoint's config")
    crop = cfg.crop_size
    model = build_trained_model(state)
    batches = [blobs[i:i + batch_size] for i in range(0, len(blobs), batch_size)]
    feed = iter(batches)
    pipe = dali.files_pipeline(lambda: [np.frombuffer(b, dtype=np.uint8) for b in next(feed)],
                               device="cpu", crop_size=crop, resize_to=base_side(crop),
                               mean=[255 * m for m in mean], std=[255 * s for s in std], dtype="float32",
                               batch_size=batch_size, num_threads=len(os.sched_getaffinity(0)), device_id=None,
                               prefetch_queue_depth=1)
    pipe.build()
    probs = []
    with torch.no_grad():
        for _ in batches:
            (images,) = pipe.run()
            x = torch.from_numpy(np.array(images.as_tensor()))
            with autocast(cfg, x.device):  # the precision the run evaluated in
                probs.append(model(x).float().softmax(dim=1))
    return torch.cat(probs) if probs else torch.empty(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.predict",
                                description="Top-k classes of image files with a trained checkpoint.")
    p.add_argument("target", help="a run directory (its newest checkpoint) or a checkpoint file or folder")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files (JPEG, PNG) or folders of them")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--shards", default=None, help="the set the class names and normalisation come from "
                                                  "(default: the run's shards_dir)")
    args = p.parse_args(argv)
    from pipeline.corrupt import undecodable

    try:
        if args.topk < 1:
            raise ValueError(f"--topk: must be >= 1, got {args.topk}")
        _, state = load_trained(args.target)
        classes, mean, std = set_facts(args.shards or state["config"]["shards_dir"])
        paths = list(image_paths(args.paths))
        if not paths:
            raise FileNotFoundError(f"{' '.join(args.paths)}: no .jpg, .jpeg or .png images there")
        errors: dict[int, str] = {}
        blobs: list[bytes] = []
        for i, path in enumerate(paths):
            try:
                blobs.append(path.read_bytes())
            except OSError as err:
                errors[i] = f"cannot read it ({err.strerror or err})"
                blobs.append(b"")
        readable = [i for i in range(len(paths)) if i not in errors]
        for j in undecodable([blobs[i] for i in readable]):
            errors[readable[j]] = "not an image the decoder can read (corrupt, or not JPEG/PNG)"
        good = [i for i in range(len(paths)) if i not in errors]
        probs = predict(state, [blobs[i] for i in good], mean, std)
    except (ValueError, OSError) as err:  # StorageError and FileNotFoundError included: one line
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    k = min(args.topk, probs.shape[1]) if len(good) else 0
    rows = dict(zip(good, probs.topk(k, dim=1)[0].tolist(), strict=True)) if good else {}
    picks = dict(zip(good, probs.topk(k, dim=1)[1].tolist(), strict=True)) if good else {}
    for i, path in enumerate(paths):
        if i in errors:
            line = json.dumps({"path": str(path), "error": errors[i]}) if args.json else f"{path}: {errors[i]}"
            print(line, file=sys.stdout if args.json else sys.stderr)
            continue
        top = [{"index": c, "wnid": classes[c]["wnid"], "name": classes[c]["name"], "prob": round(pr, 6)}
               for c, pr in zip(picks[i], rows[i])]
        if args.json:
            print(json.dumps({"path": str(path), "top": top}))
        else:
            print(str(path))
            for t in top:
                print(f"  {t['prob']:7.2%}  {t['index']:>4}  {t['wnid']}  {t['name']}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
