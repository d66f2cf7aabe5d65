"""LitData on the same JPEG bytes: the shard set written once by `litdata.optimize()` into its
chunks (timed apart: a packing cost, as `shards build` is ours), then read with
`StreamingDataset` + `StreamingDataLoader` as its README recommends for ImageNet: the encoded
image stored as bytes, decoded and transformed in `__getitem__` in the DataLoader's workers
(`num_workers` = the cores), shuffled per epoch in train with full batches only. Its ImageNet
example decodes with torchvision, which does not import beside this project's torch, so here
the workers run the torch baseline's PIL chain (the same work, the same decoder as torch).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.peers.tars import read_tar
from pipeline.stats import Stats

CHUNK_BYTES = "64MB"  # LitData's recommended chunk size for images


def pack_tar(tar: str):
    """optimize()'s fn: one item per sample of a tar (LitData calls it in its workers)."""
    for key, data, label in read_tar(tar):
        yield {"key": key, "jpeg": data, "label": label}


def optimize_set(tars: list[Path], out: Path, workers: int) -> dict:
    """Write the samples of `tars` into LitData chunks under `out` (once: reused while its
    index is there); the figures of the write (seconds, images/s, bytes) or of the reuse."""
    import litdata

    index = Path(out) / "index.json"
    if index.is_file():
        return {"reused": True, **_size(out)}
    start = time.perf_counter()
    litdata.optimize(fn=pack_tar, inputs=[str(t) for t in tars], output_dir=str(out), chunk_bytes=CHUNK_BYTES,
                     num_workers=workers, verbose=False, start_method="fork")
    seconds = time.perf_counter() - start
    size = _size(out)
    return {"reused": False, "seconds": round(seconds, 2), "workers": workers, "chunk_bytes": CHUNK_BYTES, **size,
            "images_per_s": round(size["images"] / seconds, 1)}


def _size(out: Path) -> dict:
    import json

    meta = json.loads((Path(out) / "index.json").read_text())
    chunks = meta.get("chunks", [])
    return {"images": sum(c.get("chunk_size", 0) for c in chunks), "chunks": len(chunks),
            "bytes": sum(p.stat().st_size for p in Path(out).glob("*.bin"))}


def _dataset_class():
    """The StreamingDataset subclass (made on first use: litdata imports only in its child)."""
    import litdata

    from bench.peers.transforms import pil_chain

    class Decoded(litdata.StreamingDataset):
        def __init__(self, input_dir: str, split: str, crop: int, stats: Stats, seed: int) -> None:
            train = split == "train"
            super().__init__(input_dir, shuffle=train, drop_last=train, seed=seed)
            self.chain, self.rng = pil_chain(split, crop, stats), None

        def __getitem__(self, index):
            import io

            from PIL import Image

            item = super().__getitem__(index)
            if self.rng is None:  # one generator per worker
                self.rng = np.random.default_rng()
            img = Image.open(io.BytesIO(item["jpeg"])).convert("RGB")
            return torch.from_numpy(self.chain(img, self.rng)), item["label"], item["key"]

    return Decoded


class LitDataLoader:
    """One rank's batches `(images, labels)` (or with keys) per `iter()`, as `make_loader`'s."""

    def __init__(self, data_dir: Path, split: str, batch_size: int, crop_size: int, threads: int, stats: Stats,
                 seed: int = 0, return_keys: bool = False, prefetch: int = 2) -> None:
        import litdata

        self.dataset = _dataset_class()(str(data_dir), split, crop_size, stats, seed)
        train = split == "train"
        self.loader = litdata.StreamingDataLoader(self.dataset, batch_size=batch_size, num_workers=threads,
                                                  drop_last=train, prefetch_factor=prefetch if threads else None)
        total = len(self.dataset)
        self.batch_size, self.return_keys = batch_size, return_keys
        self.num_samples = total // batch_size * batch_size if train else total
        self.settings = {"num_workers": threads, "batch_size": batch_size, "prefetch_factor": prefetch,
                         "shuffle": train, "drop_last": train, "chunk_bytes": CHUNK_BYTES,
                         "decode": "PIL in __getitem__ (torchvision.io does not import beside this torch)"}

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        for images, labels, keys in self.loader:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            yield (images, labels, list(keys)) if self.return_keys else (images, labels)
