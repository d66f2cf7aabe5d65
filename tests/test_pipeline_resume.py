"""Resuming a loader mid-epoch: `state_dict()` after k batches, `load_state_dict()` into a
fresh loader, and the rest of the epoch comes out exactly as an uninterrupted pass's (same
samples in the same batches, same augmentation: equal pixels), for DALI (its pipeline
checkpoint) and the torch baseline (its deterministic position), on the demo shards."""
from __future__ import annotations

import pytest
import torch

from pipeline import make_loader

ARGS = dict(split="train", batch_size=8, rank=1, world_size=2, device="cpu", crop_size=56, return_keys=True)


def one_pass(loader, stop: int | None = None) -> list[tuple[torch.Tensor, list[str]]]:
    out = []
    for images, _, keys in loader:
        out.append((images.clone(), keys))
        if stop is not None and len(out) == stop:
            break
    return out


def assert_same(a, b) -> None:
    assert [k for _, k in a] == [k for _, k in b]
    for (x, _), (y, _) in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend,threads", [("dali", 1), ("torch", 0), ("torch", 2)])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(demo_shards, backend, threads):
    make = lambda: make_loader(str(demo_shards), backend=backend, num_threads=threads, seed=3, **ARGS)  # noqa: E731
    reference = make()
    reference.set_epoch(1)
    full = one_pass(reference)
    assert len(full) == len(reference) >= 5
    for k in (1, 3):  # 3 with 2 DataLoader workers: resumes on the second worker's run
        first = make()
        first.set_epoch(1)
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = first.state_dict()
        assert (state["epoch"], state["batch"]) == (1, k)
        resumed = make()
        resumed.load_state_dict(state)
        rest = one_pass(resumed)
        assert_same([(b[0], b[2]) for b in head] + rest, full)
        assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batch"] == 0
        del it


def test_state_at_an_epoch_end_starts_the_next_epoch(demo_shards):
    loader = make_loader(str(demo_shards), **ARGS)
    one_pass(loader)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"], state["backend_state"]) == (1, 0, None)
    fresh = make_loader(str(demo_shards), **ARGS)
    fresh.load_state_dict(state)
    assert fresh.epoch == 1
    one_pass(loader, stop=2)  # left early: nothing of that pass is kept
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch"] == 0


def test_a_state_of_another_sharding_is_refused(demo_shards):
    loader = make_loader(str(demo_shards), **ARGS)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = make_loader(str(demo_shards), **{**ARGS, "rank": 0, "world_size": 1})
    with pytest.raises(ValueError, match=r"rank=1, world_size=2.*only valid for the same sharding") as err:
        other.load_state_dict(state)
    assert "\n" not in str(err.value)
