"""`LoaderSpec`: what one rank's loader reads and how, and the rank arithmetic both backends
share (so DALI and the torch baseline split data, count batches and reshuffle the same way).

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

from dataclasses import dataclass, field

import numpy as np

from pipeline.remainder import Remainder
from pipeline.shardset import ShardSplit
from pipeline.stats import Stats


def base_side(crop_size: int) -> int:
    """The side that `crop_size` is cut from: 256 for 224, scaled for other crops."""
    return round(crop_size * 256 / 224)


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the samples rank `rank` reads, exactly as DALI's readers split them
    (`shard_id * N // num_shards`): parts differ in size by at most one sample."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


@dataclass(frozen=True)
class LoaderSpec:
    """One rank's loader, fully decided: the opened split, the checked options of make_loader
    (`pipeline.options`), and what of the split this rank reads in each epoch."""

    data: ShardSplit
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
    def stats(self) -> Stats:
        return self.data.stats

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
        self.data.check_space([i for i, _, _ in self.part_files(self.epoch)],
                              f"rank {self.rank}'s part of {self.data.uri}/{self.data.split}")

    def epoch_seed(self, epoch: int) -> int:
        """Seed of this rank's random draws (shuffle, crops, flips, lighting) in `epoch`."""
        return int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0] >> 1)
