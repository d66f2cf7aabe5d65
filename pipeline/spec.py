"""What one rank's loader reads and how: checked options and the rank arithmetic both
backends share (so DALI and the torch baseline split data, count batches and reshuffle
the same way).

Across ranks (DESIGN.md "Pipeline API"):
- every rank reads the contiguous part `[r*N//W, (r+1)*N//W)` of the split's samples, in
  the order of its tars (DALI's own split, so parts differ by at most one sample);
- train: every rank yields `(N // W) // batch_size` full batches per epoch, the same on all
  ranks (so DDP never waits on a rank that has run out); the tar order is permuted per
  epoch with a seed shared by all ranks, so each epoch the parts hold other tars, and
  samples are shuffled within each rank's buffer;
- val: every sample once across all ranks, no padding, none dropped: a rank yields
  `ceil(part / batch_size)` batches, its last one possibly short (or none for an empty part).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.remainder import Remainder, positions_bytes
from pipeline.shardset import ShardSplit, open_split, stored_side, rank_range
from pipeline.stats import Stats, read_stats

CROPS = ("rrc", "paper")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("dali", "torch")
DEVICES = ("cuda", "cpu")
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


def base_side(crop_size: int) -> int:
    """The side that `crop_size` is cut from: 256 for 224, scaled for other crops."""
    return round(crop_size * 256 / 224)


@dataclass(frozen=True)
class LoaderSpec:
    data: ShardSplit
    stats: Stats
    batch_size: int
    rank: int
    world_size: int
    device: str
    crop_size: int
    seed: int
    return_keys: bool
    crop: str
    ten_crop: bool
    num_threads: int
    prefetch: int
    dtype: str
    lighting: bool
    rrc_scale: tuple[float, float]
    epoch: int
    device_id: int | None
    shuffle_buffer: int
    on_corrupt: str = "error"
    hw_decoder_load: float | None = None  # the mixed decoder's hardware share (GPU graphs); None: DALI's
    auto: tuple[str, ...] = ()  # the settings make_loader probes before the first pass ("num_threads", ...)
    remainder: Remainder | None = None  # train, after a resize: what is left of one epoch (pipeline.remainder)
    part: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "part", rank_range(self.data.num_samples, self.rank, self.world_size))

    @property
    def train(self) -> bool:
        return self.data.split == "train"

    @property
    def resize_to(self) -> int:
        return base_side(self.crop_size)

    @property
    def num_batches(self) -> int:
        """Batches this rank yields per epoch (`len(loader)`). In an epoch resharded after a
        resize (`remainder`): the steps it had taken, and as many full batches of what is
        left as every new rank can yield."""
        if self.remainder is not None:
            left = self.remainder.left(self.data.num_samples)
            return self.remainder.steps_done + (left // self.world_size) // self.batch_size
        if self.train:
            return (self.data.num_samples // self.world_size) // self.batch_size
        return -(-(self.part[1] - self.part[0]) // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        if self.train:
            return self.num_batches * self.batch_size
        return self.part[1] - self.part[0]

    def tar_order(self, epoch: int) -> list[int]:
        """The order the tars are read in this epoch: permuted per epoch in train (the same
        permutation on every rank), stored order in val."""
        n = len(self.data.tars)
        if not self.train:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n).tolist()

    def tar_offsets(self, epoch: int) -> dict[int, int]:
        """Each tar's first position in the epoch's read order (its samples follow in index order)."""
        out, start = {}, 0
        for i in self.tar_order(epoch):
            out[i] = start
            start += self.data.counts[i]
        return out

    def resharded(self, epoch: int) -> bool:
        return self.remainder is not None and self.remainder.epoch == epoch

    def positions(self, epoch: int) -> np.ndarray:
        """The positions of `epoch`'s read order this rank reads, ascending: its contiguous
        part, or in a resharded epoch its run of what is left."""
        if self.resharded(epoch):
            return self.remainder.rank_positions(self.data.num_samples, self.rank, self.world_size)
        return np.arange(*self.part)

    def done_rows(self, epoch: int, tar: int) -> set[int]:
        """Rows of tar `tar`'s index already trained on in a resharded `epoch` (empty otherwise)."""
        if not self.resharded(epoch):
            return set()
        start = self.tar_offsets(epoch)[tar]
        done = self.remainder.done_mask(self.data.num_samples)[start: start + self.data.counts[tar]]
        return set(np.flatnonzero(done).tolist())

    def part_files(self, epoch: int) -> list[tuple[int, int, int]]:
        """What this rank reads in `epoch`, in read order: (tar index, first, end) for each
        tar its part touches, `first`/`end` the samples of that tar inside the part (in a
        resharded epoch the span of its run, less `done_rows`)."""
        pos = self.positions(epoch)
        if not len(pos):
            return []
        lo, hi = int(pos[0]), int(pos[-1]) + 1
        out, start = [], 0
        for i in self.tar_order(epoch):
            n = self.data.counts[i]
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                out.append((i, a - start, b - start))
            start += n
        return out

    def stage(self, epoch: int) -> None:
        """Make the tars of this rank's part of `epoch` local (remote sets) and start staging
        the next epoch's in the background, so staging shows as data-wait only once."""
        now = [i for i, _, _ in self.part_files(epoch)]
        then = [i for i, _, _ in self.part_files(epoch + 1)] if self.train else []
        self.data.ensure(now, [i for i in then if i not in now])

    def check_staging(self) -> None:
        """Remote sets: one line now, before any batch, if the cache disk cannot hold a pass."""
        if self.data.cache is not None and not isinstance(self.data.tars[0], str):
            rels = [f"{self.data.split}/{Path(self.data.tars[i]).name}" for i, _, _ in self.part_files(self.epoch)]
            self.data.cache.check_space(rels, f"rank {self.rank}'s part of {self.data.uri}/{self.data.split}")

    def epoch_seed(self, epoch: int) -> int:
        """Seed of this rank's random draws (shuffle, crops, flips, lighting) in `epoch`."""
        return int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0] >> 1)


def resolve(shards_dir, split, batch_size, rank, world_size, device, backend, crop_size, seed,
            return_keys, extra: dict) -> LoaderSpec:
    """Check every argument of make_loader up front; one line naming the bad one."""
    unknown = sorted(set(extra) - set(EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(f"make_loader: unknown argument(s) {unknown}; valid extras: {sorted(EXTRA_DEFAULTS)}")
    opts = {**EXTRA_DEFAULTS, **extra}
    _choice("backend", backend, BACKENDS)
    _choice("device", device, DEVICES)
    _choice("crop", opts["crop"], CROPS)
    _choice("dtype", opts["dtype"], DTYPES)
    _choice("on_corrupt", opts["on_corrupt"], ("error", "skip"))
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
    stored = stored_side(data.root, split)
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
        data=data, stats=read_stats(data.root), batch_size=batch_size, rank=rank,
        world_size=world_size, device=device, crop_size=crop_size, seed=int(seed),
        return_keys=bool(return_keys), crop=opts["crop"], ten_crop=bool(opts["ten_crop"]),
        num_threads=int(threads), prefetch=max(1, int(opts["prefetch"])), dtype=opts["dtype"],
        lighting=bool(opts["lighting"]), rrc_scale=(lo, hi), epoch=int(opts["epoch"]),
        device_id=opts["device_id"], shuffle_buffer=max(1, int(opts["shuffle_buffer"])),
        on_corrupt=opts["on_corrupt"], hw_decoder_load=None if load is None else float(load), auto=tuple(auto),
    )
    spec.check_staging()
    return spec


def _choice(name: str, value, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(valid)}")


class EpochLoader:
    """What both backends' loaders share: `len()`, `num_samples`, the epoch counter (each
    pass over the loader reads `epoch`, then counts it on; `set_epoch` sets it), and where
    the loader stands (`state_dict` / `load_state_dict`): the pass, the batches it has handed
    out, and the backend's own state to continue exactly there (DALI: the pipeline's
    checkpoint; the baseline: its deterministic position), so a resumed run reads the same
    samples with the same augmentation as an uninterrupted one."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = self._base = spec
        self.epoch = spec.epoch
        self._pass: tuple[int, int] | None = None  # (epoch, batches handed out) while a pass runs
        self._resume: dict | None = None
        self._skipped: list[dict] = []
        self._tuning: dict | None = None

    def __len__(self) -> int:
        return self.spec.num_batches

    @property
    def dataset_size(self) -> int:
        """Samples in the whole split, all ranks together."""
        return self.spec.data.num_samples

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (train: its full batches; val: its whole part)."""
        return self.spec.num_samples

    @property
    def skipped(self) -> list[dict]:
        """Corrupt samples left out so far (on_corrupt="skip"), one dict each: `shard`, `key`,
        `epoch`; it only grows, so a caller counts a pass's skips as the difference."""
        return self._skipped

    @property
    def settings(self) -> dict[str, Any]:
        """The decoding settings in effect, after any "auto" tuning: `num_threads` (DALI threads,
        or the baseline's DataLoader workers) and `hw_decoder_load` (None: DALI's default)."""
        return {"num_threads": self.spec.num_threads, "hw_decoder_load": self.spec.hw_decoder_load}

    @property
    def tuning(self) -> dict | None:
        """What the "auto" settings chose and measured (`pipeline.tuning.tune`'s report: tuned,
        chosen, probes, seconds, budget_s), or None where nothing was tuned."""
        return self._tuning

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _next_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.spec.remainder is not None and self.spec.remainder.epoch != epoch:
            self.spec = self._base  # a resharded epoch is over: the next ones read whole parts
        return epoch

    def reshard(self, remainder: Remainder) -> None:
        """The next pass reads what is left of epoch `remainder.epoch` after a resize, this
        rank's run of it (`pipeline.remainder`); `len()` counts the steps taken before it."""
        self.spec = replace(self._base, remainder=remainder)
        self.epoch, self._resume = remainder.epoch, None

    def _shape(self) -> dict:
        s = self.spec
        return {"rank": s.rank, "world_size": s.world_size, "batch_size": s.batch_size, "seed": s.seed,
                "samples": s.data.num_samples, "backend": type(self).__name__}

    def state_dict(self) -> dict:
        """Where the loader stands: `epoch` (the pass to read next, or the one under way) and
        `batch` (the batches of it already handed out), with the backend's state."""
        if self._pass is None or self._pass[1] >= len(self):
            epoch = self._pass[0] + 1 if self._pass is not None else self.epoch
            return {**self._shape(), "epoch": epoch, "batch": 0, "backend_state": None}
        epoch, batch = self._pass
        state = {**self._shape(), "epoch": epoch, "batch": batch, "backend_state": self._backend_state(),
                 "positions": positions_bytes(self._handed_positions())}  # what a resize needs
        if self.spec.resharded(epoch):
            state["remainder"] = self.spec.remainder.to_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (of a loader of the same shape: rank, world size, batch size,
        seed, sample count); the next pass resumes that epoch at that batch."""
        mine = self._shape()
        differ = [k for k in mine if state.get(k) != mine[k]]
        if differ:
            raise ValueError(f"loader state is for {', '.join(f'{k}={state.get(k)!r}' for k in differ)}, this loader "
                             f"has {', '.join(f'{k}={mine[k]!r}' for k in differ)}: a saved reader position is only "
                             "valid for the same sharding")
        self.epoch = int(state["epoch"])
        self._resume = state if state["batch"] else None
        remainder = Remainder.from_dict(state.get("remainder"))
        self.spec = replace(self._base, remainder=remainder) if remainder is not None else self._base

    def _take_resume(self, epoch: int) -> dict | None:
        resume, self._resume = self._resume, None
        return resume if resume is not None and resume["epoch"] == epoch else None

    def _backend_state(self):
        return None

    def _handed_positions(self) -> list[int]:
        """Positions (in the epoch's read order) of the samples handed out in the pass under way."""
        raise NotImplementedError
