"""The rest of an epoch after a resize: the samples no committed step has trained on,
split across a new world size.

A rank's reader position is only valid for the sharding that made it (DALI restores a saved
state into a pipeline with another `num_shards` without an error and reads the wrong
samples). What is valid for any sharding is *which* samples an epoch has used: the epoch's
read order is fixed by the seed and the shard set (`LoaderSpec.tar_order`), so a sample is
named by its position in that order, and every rank's loader state lists the positions it
has handed out (`EpochLoader.state_dict`). After a resize the union of those lists over the
old ranks is what the epoch has used; the positions left, in read order, are dealt to the
new ranks in contiguous runs of equal size (each rank then yields the same number of full
batches), and each rank's DALI reader gets an index listing exactly its run.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Remainder:
    """What is left of epoch `epoch`: `done` marks (np.packbits) the positions of its read order
    already trained on, by `steps_done` steps at whatever world sizes took them."""

    epoch: int
    done: bytes
    steps_done: int

    def done_mask(self, num_samples: int) -> np.ndarray:
        return _unpack(self.done, num_samples)

    def left(self, num_samples: int) -> int:
        return num_samples - int(self.done_mask(num_samples).sum())

    def rank_positions(self, num_samples: int, rank: int, world_size: int) -> np.ndarray:
        """The positions rank `rank` of `world_size` reads: its run of the positions left."""
        left = np.flatnonzero(~self.done_mask(num_samples))
        n = len(left)
        return left[rank * n // world_size: (rank + 1) * n // world_size]

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "done": self.done, "steps_done": self.steps_done}

    @classmethod
    def from_dict(cls, d: dict | None) -> Remainder | None:
        return None if not d else cls(int(d["epoch"]), bytes(d["done"]), int(d["steps_done"]))


@lru_cache(maxsize=4)
def _unpack(done: bytes, num_samples: int) -> np.ndarray:
    mask = np.unpackbits(np.frombuffer(done, np.uint8), count=num_samples).astype(bool)
    mask.flags.writeable = False  # shared by every caller
    return mask


def positions_bytes(positions) -> bytes:
    return np.asarray(sorted(positions), dtype=np.int64).tobytes()


def used_by(states: list[dict], epoch: int, num_samples: int) -> tuple[np.ndarray, int]:
    """(positions of `epoch` the old ranks trained on as a mask, steps taken): from every old
    rank's loader state at the same checkpoint (each lists what it handed out, on top of the
    remainder it was itself reading, if any)."""
    done = np.zeros(num_samples, dtype=bool)
    steps = {int(s["batch"]) for s in states}
    if len(steps) != 1:
        raise ValueError(f"the ranks' loader states disagree on the step of epoch {epoch}: {sorted(steps)}")
    for s in states:
        if int(s["epoch"]) != epoch or "positions" not in s:
            raise ValueError(f"a rank's loader state is for epoch {s['epoch']} or lists no positions "
                             f"(written before elastic resharding): epoch {epoch + 1} cannot be resharded")
        inherited = Remainder.from_dict(s.get("remainder"))
        if inherited is not None:
            done |= inherited.done_mask(num_samples)
        done[np.frombuffer(s["positions"], np.int64)] = True
    return done, steps.pop()


def remainder_of(states: list[dict], epoch: int, num_samples: int) -> Remainder:
    done, steps = used_by(states, epoch, num_samples)
    return Remainder(epoch, np.packbits(done).tobytes(), steps)
