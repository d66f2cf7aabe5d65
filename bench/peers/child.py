"""The process one loader runs in (`python -m bench.peers.child serve|check SPEC_JSON`), with
its peer's side environment on PYTHONPATH (`bench.peers.install`).

serve: lines on stdin drive it: `open` starts a pass (a new epoch, as the bench opens every
source fresh each round), `next` hands over one batch and answers `{"n": images, "timed":
false for a batch that began a new epoch}`, `close` ends the pass (its threads, workers and
pipeline go). The answers go to the original stdout; everything the libraries print goes to
stderr. Epochs roll over without end while a pass is open.

check: one whole epoch, counting samples and batches, with the shape and dtype of the images
and labels, and the first `keep` samples (keys and float tensors) written to `out` (.npz).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator

import numpy as np


def open_loader(spec: dict) -> tuple:
    from bench.peers.loaders import build_loader

    return build_loader(spec["loader"], spec["shards_dir"], spec["split"], spec["batch_size"], spec["crop_size"],
                        spec["threads"], spec.get("seed", 0), spec.get("return_keys", False),
                        spec.get("litdata_dir"))


def batches(loader) -> Iterator[tuple[int, bool]]:
    while True:
        first = True
        for batch in loader:
            yield int(batch[0].shape[0]), not first
            first = False


def serve(spec: dict, out) -> None:
    loader, settings = open_loader(spec)
    out.write(json.dumps({"ready": True, "settings": settings, "num_samples": loader.num_samples}) + "\n")
    out.flush()
    run = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "open":
            run = batches(loader)
            reply = {"opened": True}
        elif cmd == "next":
            n, timed = next(run)
            reply = {"n": n, "timed": timed}
        elif cmd == "close":
            run.close()
            run = None
            reply = {"closed": True}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def check(spec: dict, path: str, keep: int) -> dict:
    """One epoch of the loader, counted; the first `keep` samples saved to `path`."""
    import torch

    spec = {**spec, "return_keys": True}
    loader, settings = open_loader(spec)
    start = time.perf_counter()
    samples = batches_ = 0
    keys: list[str] = []
    kept, shape, dtype, label_dtype = [], None, None, None
    for images, labels, names in loader:
        samples += int(images.shape[0])
        batches_ += 1
        keys += list(names)
        shape, dtype, label_dtype = list(images.shape[1:]), str(images.dtype), str(labels.dtype)
        if sum(len(k) for k in kept) < keep:
            kept.append(images[: keep - sum(len(k) for k in kept)].to(torch.float32).numpy())
    stacked = np.concatenate(kept) if kept else np.zeros((0, 3, 1, 1), np.float32)
    np.savez(path, images=stacked, keys=np.array(keys[: len(stacked)]))
    return {"samples": samples, "batches": batches_, "expected": loader.num_samples, "unique_keys": len(set(keys)),
            "image_shape": shape, "image_dtype": dtype, "label_dtype": label_dtype,
            "seconds": round(time.perf_counter() - start, 2), "settings": settings}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mode, spec = argv[0], json.loads(argv[1])
    out = os.fdopen(os.dup(1), "w")  # the answers' channel; the libraries' prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if mode == "serve":
        serve(spec, out)
    elif mode == "check":
        out.write(json.dumps(check(spec, argv[2], int(argv[3]))) + "\n")
        out.flush()
    else:
        raise SystemExit(f"bench.peers.child: mode {mode!r}: serve or check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
