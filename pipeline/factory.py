"""`make_loader`, the one entry point of the pipeline stage (DESIGN.md "Pipeline API"):
arguments checked into a spec with the split opened (`pipeline.options`), "auto" settings
probed (`pipeline.tuning`), then the backend's loader (`pipeline.loaders`).
"""
from __future__ import annotations

import os

from pipeline.loaders import DaliLoader, EpochLoader
from pipeline.options import make_spec
from pipeline.tuning import tune


def make_loader(
    shards_dir: str | os.PathLike,
    split: str = "train",
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cuda",
    backend: str = "dali",
    crop_size: int = 224,
    seed: int = 0,
    return_keys: bool = False,
    **extra,
) -> EpochLoader:
    """Batches of `split` for rank `rank` of `world_size` (DESIGN.md "Pipeline API").

    Yields `(images, labels)` or, with `return_keys`, `(images, labels, keys)`: images
    `[B, 3, crop, crop]` (ten-crop: `[B, 10, 3, crop, crop]`, views ordered top-left,
    top-right, bottom-left, bottom-right, centre, then the same five mirrored) in `dtype`,
    normalised with the shard set's stats.json, on `device`; labels int64 `[B]`; keys the
    WebDataset sample keys (list of str). Extras, with defaults: see `options.EXTRA_DEFAULTS`.

    The loader has `len()` (batches this rank yields per epoch), `num_samples` (samples this
    rank yields per epoch), `dataset_size`, `settings`, `skipped` and `tuning` (see
    `loaders.EpochLoader`), `set_epoch(e)` (the next pass reads epoch e) and `epoch` (the
    epoch the next pass reads). In train every rank yields the same number of full batches;
    in val every sample once across all ranks (the last batch may be short, a rank whose
    part is empty yields nothing). Bad arguments and bad shards raise one-line
    ValueError/FileNotFoundError here, before any batch is read.
    """
    spec = make_spec(shards_dir, split, batch_size, rank, world_size, device, backend, crop_size,
                     seed, return_keys, extra)
    if backend == "torch":
        from pipeline.torch_baseline import TorchLoader  # webdataset: imported only for the baseline

        return TorchLoader(spec)
    report = None
    if spec.auto:  # num_threads / hw_decoder_load "auto": probed on this rank's part, before any pass
        spec, report = tune(spec)
    return DaliLoader(spec, report)
