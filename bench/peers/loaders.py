"""One name -> one loader, every one built for the same work: the bench's crop, rrc + flip +
normalise in train (no PCA lighting: no peer has it), shorter side + centre crop in val,
float32 [B, 3, crop, crop] batches with int64 labels, `threads` = the cores for each.

    dali               make_loader(backend="dali", device="cpu"): the product's CPU graph
    torch              make_loader(backend="torch"): webdataset + PIL in a DataLoader
    torch-pillow-simd  the same, with pillow-simd standing in for Pillow (its child's PYTHONPATH)
    spdl               bench.peers.spdl_loader
    litdata            bench.peers.litdata_loader (reads the chunks `optimize()` wrote)
"""
from __future__ import annotations

from pathlib import Path

LOADERS = ("dali", "torch", "spdl", "litdata", "torch-pillow-simd")


def build_loader(name: str, shards_dir: str | Path, split: str, batch_size: int, crop_size: int, threads: int,
                 seed: int = 0, return_keys: bool = False, litdata_dir: str | Path | None = None) -> tuple:
    """(loader, settings): the loader has `iter()` (one epoch) and `num_samples`; the settings
    say what it was given."""
    from pipeline import make_loader
    from pipeline.shardset import open_split
    from pipeline.spec import base_side

    if name in ("dali", "torch", "torch-pillow-simd"):
        backend = "dali" if name == "dali" else "torch"
        loader = make_loader(str(shards_dir), split, batch_size=batch_size, device="cpu", backend=backend,
                             crop_size=crop_size, seed=seed, return_keys=return_keys, crop="rrc", lighting=False,
                             num_threads=threads)
        settings = {"backend": backend, "device": "cpu", "crop": "rrc", "lighting": False,
                                "num_threads": threads, "prefetch": loader.spec.prefetch,
                                "shuffle_buffer": loader.spec.shuffle_buffer,
                                "what": "DALI threads" if backend == "dali" else "DataLoader workers"}
        return loader, settings
    data = open_split(str(shards_dir), split)
    if name == "spdl":
        from bench.peers.spdl_loader import SpdlLoader

        loader = SpdlLoader([Path(t) for t in data.tars], list(data.counts), split, batch_size, crop_size, threads,
                            data.stats, base_side(crop_size), seed, return_keys)
    elif name == "litdata":
        from bench.peers.litdata_loader import LitDataLoader

        if litdata_dir is None:
            raise ValueError("litdata: pass the folder optimize() wrote (litdata_dir)")
        loader = LitDataLoader(Path(litdata_dir), split, batch_size, crop_size, threads, data.stats, seed,
                               return_keys)
    else:
        raise ValueError(f"loader {name!r}: choose one of {', '.join(LOADERS)}")
    return loader, loader.settings
