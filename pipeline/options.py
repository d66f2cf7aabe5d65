"""make_loader's arguments: the extras with their defaults, and the checks that turn the
whole call into a `LoaderSpec` (or one line naming the bad argument) before any batch is read.
"""
from __future__ import annotations

import os

from pipeline.shardset import open_split
from pipeline.spec import LoaderSpec

CROPS = ("rrc", "paper")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("dali", "torch")
DEVICES = ("cuda", "cpu")
ON_CORRUPT = ("error", "skip")
# The extra keyword arguments of make_loader, with their defaults.
EXTRA_DEFAULTS: dict = {
    "crop": "rrc",  # train crop policy: "rrc" (RandomResizedCrop) or "paper"
    "ten_crop": False,  # val: the paper's ten views per image, images [B, 10, 3, crop, crop]
    "num_threads": None,  # DALI threads / DataLoader workers; None: the usable cores, at most 8;
    #                       "auto" (DALI): probed on the rank's own shards (pipeline.tuning)
    "hw_decoder_load": None,  # DALI mixed decoder: share of JPEGs for the hardware decoder, 0..1;
    #                           None: DALI's default (0.65); "auto": probed (pipeline.tuning)
    "prefetch": 2,  # batches prepared ahead (DALI prefetch_queue_depth, DataLoader prefetch_factor)
    "dtype": "float32",
    "lighting": True,  # PCA lighting in train
    "rrc_scale": (0.08, 1.0),
    "epoch": 0,  # first epoch to read (seeds its reshuffle); later passes count on from it
    "device_id": None,  # DALI's CUDA device: a logical index; None: torch.cuda.current_device()
    "index_cache_dir": None,  # where indexes of foreign shards go; None: ~/.cache/alexnet-dali/idx
    "shuffle_buffer": 1024,  # per-rank sample shuffle buffer (DALI initial_fill)
    "cache_dir": None,  # remote sets: node-local staging folder; None: ~/.cache/alexnet-dali/shards;
    #                     "none": stream the tars through DALI's own S3 reader (DALI backend only)
    "cache_max_gb": 0.0,  # bound on the staging folder (least recently used shards go); 0: none
    "on_corrupt": "error",  # a sample that does not decode: "error" (one line naming shard and key) or "skip"
}


def make_spec(shards_dir, split, batch_size, rank, world_size, device, backend, crop_size, seed,
              return_keys, extra: dict) -> LoaderSpec:
    """The spec of one rank's loader from make_loader's arguments, every one checked up front
    (one line naming the bad one), with the split opened (`pipeline.shardset`)."""
    unknown = sorted(set(extra) - set(EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(f"make_loader: unknown argument(s) {unknown}; valid extras: {sorted(EXTRA_DEFAULTS)}")
    opts = {**EXTRA_DEFAULTS, **extra}
    _choice("backend", backend, BACKENDS)
    _choice("device", device, DEVICES)
    _choice("crop", opts["crop"], CROPS)
    _choice("dtype", opts["dtype"], DTYPES)
    _choice("on_corrupt", opts["on_corrupt"], ON_CORRUPT)
    for name, value in (("batch_size", batch_size), ("world_size", world_size), ("crop_size", crop_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: must be in [0, world_size={world_size})")
    lo, hi = (float(v) for v in opts["rrc_scale"])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"rrc_scale={opts['rrc_scale']!r}: need 0 < min <= max <= 1")
    if opts["ten_crop"] and split != "val":
        raise ValueError("ten_crop=True is the val protocol: use it with split='val'")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA GPU: pass device='cpu'")
    if opts["cache_dir"] is not None and str(opts["cache_dir"]).lower() == "none" and backend == "torch":
        raise ValueError("cache_dir='none' streams through DALI's S3 reader: use backend='dali', or stage "
                         "the shards (cache_dir=None or a folder)")
    if float(opts["cache_max_gb"]) < 0:
        raise ValueError(f"cache_max_gb={opts['cache_max_gb']!r}: must be >= 0 (0: unbounded)")
    data = open_split(shards_dir, split, opts["index_cache_dir"], opts["cache_dir"], float(opts["cache_max_gb"]))
    stored = data.stored_side
    if stored is not None and crop_size > stored:
        raise ValueError(
            f"crop_size={crop_size} is larger than the stored {split} images (median shorter side {stored} "
            f"in {data.uri}/manifest.parquet): pass crop_size <= {stored} or re-pack with a larger --shorter-side"
        )
    if split == "train" and data.num_samples // world_size < batch_size:
        raise ValueError(
            f"batch_size={batch_size}: each of the {world_size} rank(s) holds only "
            f"{data.num_samples // world_size} of the {data.num_samples} train samples in {data.uri}: "
            "lower batch_size or world_size"
        )
    threads, load, auto = opts["num_threads"], opts["hw_decoder_load"], []
    if threads == "auto" or load == "auto":
        if backend != "dali":
            raise ValueError("num_threads/hw_decoder_load='auto' probes DALI pipelines: use backend='dali' "
                             "or pass numbers")
    if threads == "auto":
        threads = None
        auto.append("num_threads")
    if threads is None:
        threads = max(1, min(8, len(os.sched_getaffinity(0))))
    elif not isinstance(threads, int) or threads < (0 if backend == "torch" else 1):  # 0: the baseline in-process
        raise ValueError(f"num_threads={threads!r}: must be an integer >= 1 or 'auto' (0 DataLoader workers is "
                         "for backend='torch' only)")
    if load == "auto":
        load = None
        if device == "cuda":  # only the mixed (GPU) decoder has a hardware share to tune
            auto.append("hw_decoder_load")
    elif load is not None and (isinstance(load, bool) or not isinstance(load, (int, float)) or not 0 <= load <= 1):
        raise ValueError(f"hw_decoder_load={load!r}: must be a number in [0, 1], 'auto' or None (DALI's default)")
    spec = LoaderSpec(
        data=data, batch_size=batch_size, rank=rank,
        world_size=world_size, device=device, crop_size=crop_size, seed=int(seed),
        return_keys=bool(return_keys), crop=opts["crop"], ten_crop=bool(opts["ten_crop"]),
        num_threads=int(threads), prefetch=max(1, int(opts["prefetch"])), dtype=opts["dtype"],
        lighting=bool(opts["lighting"]), rrc_scale=(lo, hi), epoch=int(opts["epoch"]),
        device_id=opts["device_id"], shuffle_buffer=max(1, int(opts["shuffle_buffer"])),
        on_corrupt=opts["on_corrupt"], hw_decoder_load=None if load is None else float(load), auto=tuple(auto),
    )
    spec.data.check([i for i, _, _ in spec.part_files(spec.epoch)])  # this rank's part, not the split: O(part)
    spec.check_staging()
    return spec


def _choice(name: str, value, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(valid)}")
