"""Resharding the rest of an epoch after a resize (pipeline/remainder.py), on the real
demo_shards (240 train samples in several tars) through real DALI (CPU) and the torch
baseline: whatever world sizes take an epoch's steps, every sample is trained at most
once, and all but fewer than one global batch of the shape that ends the epoch are trained."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import make_loader
from pipeline.remainder import remainder_of

BATCH = 16


def loader(shards, rank: int, world_size: int, backend: str, batch_size: int = BATCH):
    return make_loader(shards, "train", batch_size=batch_size, rank=rank, world_size=world_size, device="cpu",
                       backend=backend, crop_size=32, seed=3, return_keys=True,
                       num_threads=1 if backend == "dali" else 0)


def take(shards, world_size: int, steps: int | None, backend: str, remainder=None, batch_size: int = BATCH):
    """`steps` steps (None: the rest of the pass) of every rank of a `world_size` group, reading
    `remainder` when given: (keys trained, each rank's state after, each rank's len())."""
    keys, states, lengths = [], [], []
    for rank in range(world_size):
        lo = loader(shards, rank, world_size, backend, batch_size)
        if remainder is not None:
            lo.reshard(remainder)
        lengths.append(len(lo))
        it = iter(lo)
        done = 0
        for batch in it:
            keys += batch[2]
            done += 1
            if steps is not None and done == steps:
                break
        states.append(lo.state_dict())
    return keys, states, lengths


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_shrink_then_grow_mid_epoch_trains_every_sample_once(demo_shards, backend):
    n = 240
    first, states, _ = take(demo_shards, 2, 3, backend)  # 3 steps of 2 x 16
    rest = remainder_of(states, 0, n)
    assert rest.steps_done == 3 and rest.left(n) == n - 96
    second, states, lengths = take(demo_shards, 1, 2, backend, rest)  # 2 steps of 1 x 16, then lost again
    assert lengths == [3 + (n - 96) // BATCH]  # the epoch's steps: those taken, and those the rest holds
    rest = remainder_of(states, 0, n)
    assert rest.steps_done == 5 and rest.left(n) == n - 96 - 32
    third, _, lengths = take(demo_shards, 3, None, backend, rest)  # grown to 3: the rest of the epoch
    left = n - 128
    assert lengths == [5 + (left // 3) // BATCH] * 3
    trained = first + second + third
    assert len(trained) == len(set(trained)), "a sample trained twice in one epoch"
    dropped = n - len(trained)
    assert dropped == left - 3 * ((left // 3) // BATCH) * BATCH and dropped < 3 * BATCH


def test_a_resharded_pass_restores_exactly_with_the_same_shape(demo_shards):
    """Mid-way through a resharded epoch a same-shape restart restores DALI's own state into
    the same reduced pipeline: the same samples with the same pixels as without the restart."""
    import torch

    n = 240
    _, states, _ = take(demo_shards, 2, 2, "dali")
    rest = remainder_of(states, 0, n)

    def rank0(start_state=None, steps=None):
        lo = loader(demo_shards, 0, 1, "dali")
        lo.reshard(rest)
        if start_state is not None:
            lo.load_state_dict(start_state)
        out, it = [], iter(lo)  # held: a pass left early and dropped starts the next epoch
        for images, _, keys in it:
            out.append((keys, images.clone()))
            if steps is not None and len(out) == steps:
                break
        return out, lo.state_dict()

    whole, _ = rank0()
    head, state = rank0(steps=3)
    assert state["remainder"]["steps_done"] == 2 and state["batch"] == 5
    tail, _ = rank0(start_state=state)
    assert [k for k, _ in head + tail] == [k for k, _ in whole]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(head + tail, whole))


def test_states_that_cannot_be_resharded_say_why(demo_shards):
    _, states, _ = take(demo_shards, 2, 1, "dali")
    older = [{k: v for k, v in s.items() if k != "positions"} for s in states]
    with pytest.raises(ValueError, match="lists no positions"):
        remainder_of(older, 0, 240)
    with pytest.raises(ValueError, match="disagree on the step"):
        remainder_of([states[0], {**states[1], "batch": 2}], 0, 240)
    mask = remainder_of(states, 0, 240).done_mask(240)
    assert mask.sum() == 32 and np.flatnonzero(mask).max() < 240
