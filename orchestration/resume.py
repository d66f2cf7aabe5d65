"""Resume at any step: where the run stands and what every rank needs to go on exactly.

A checkpoint (epoch end, or every `checkpoint_every_steps` inside an epoch) holds, besides
the fixed keys written by rank 0 (model, optimizer, scheduler, epoch, rng, config):

- `position`: `epoch` (epochs completed), `epoch_step` (steps done in the next one), `step`
  (global), `samples` / `epoch_samples` (train samples seen, all ranks: in all, and in the
  current epoch), and the shape that took them
  (`world_size`, `batch_size`);
- `ranks`: one entry per rank, gathered to rank 0 with one collective: its loader's state
  (DALI's pipeline checkpoint: reader position and every random operator's state; the
  baseline's position) and its RNGs (torch CPU and CUDA, Python).

Restored with the same world size and batch size, every rank continues with the same
samples in the same steps and the same augmentation and dropout as an uninterrupted run. With
another shape (an elastic resize, or a re-run with other `workers`/`batch_size`) the model,
optimizer and schedule continue (the schedule is defined on samples, `orchestration.schedule`)
and the rest of the interrupted epoch is resharded: the samples no committed step trained
on are split across the new ranks (`pipeline.remainder`), so every sample of the epoch is
still trained exactly once; their augmentation differs from an unresized run's.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist

from orchestration.checkpoint import rng_state, set_rng_state

log = logging.getLogger("train")


@dataclass
class Position:
    """Where the run stands: what a checkpoint records and a restart resumes from."""

    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # steps done in epoch `epoch + 1`
    step: int = 0  # global step
    samples: int = 0  # train samples seen (all ranks)
    epoch_samples: int = 0  # of which in epoch `epoch + 1`
    world_size: int = 0
    batch_size: int = 0

    @classmethod
    def of(cls, ckpt: dict[str, Any] | None) -> "Position":
        if ckpt is None:
            return cls()
        if "position" in ckpt:
            return cls(**ckpt["position"])
        return cls(epoch=ckpt["epoch"])  # an epoch checkpoint without a position

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def gather_rank_states(rank: int, world_size: int, loader) -> list[dict[str, Any]] | None:
    """Every rank's loader state and RNGs, on rank 0 (None elsewhere): one gather_object."""
    mine = {"loader": loader.state_dict(), "rng": rng_state()}
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out


def restore_rank_state(ckpt: dict[str, Any] | None, rank: int, world_size: int, batch_size: int,
                       loader) -> bool:
    """Put this rank's loader and RNGs where the checkpoint left them; True when the loader
    continues mid-epoch exactly (same shape), False when it starts its epoch afresh."""
    if ckpt is None:
        return False
    pos = Position.of(ckpt)
    ranks = ckpt.get("ranks")
    same = ranks is not None and pos.world_size == world_size and pos.batch_size == batch_size
    if not same:
        if rank == 0:
            set_rng_state(ckpt["rng"])
        if ranks is None or pos.epoch_step == 0:
            return False  # an epoch-end checkpoint: the next epoch starts whole at the new shape
        return reshard(ranks, pos, rank, world_size, batch_size, loader)
    set_rng_state(ranks[rank]["rng"])
    loader.load_state_dict(ranks[rank]["loader"])
    return pos.epoch_step > 0


def reshard(ranks: list[dict[str, Any]], pos: Position, rank: int, world_size: int, batch_size: int,
            loader) -> bool:
    """After a resize mid-epoch: this rank's loader reads its run of the samples of the epoch
    that no committed step trained on (True), or, for a checkpoint without the positions
    that takes (written before elastic resharding), the epoch's data restarts (False)."""
    from pipeline.remainder import remainder_of

    n = loader.spec.data.num_samples
    try:
        remainder = remainder_of([r["loader"] for r in ranks], pos.epoch, n)
    except ValueError as err:
        if rank == 0:
            log.warning("resuming with %d worker(s) x batch %d from a checkpoint of %d x %d: %s; epoch %d's "
                        "data restarts from its start", world_size, batch_size, pos.world_size, pos.batch_size,
                        err, pos.epoch + 1)
        return False
    used = n - remainder.left(n)
    if used != pos.epoch_samples:
        raise RuntimeError(f"the checkpoint at step {pos.step} records {pos.epoch_samples} samples of epoch "
                           f"{pos.epoch + 1} trained, its loader states {used}: it cannot be resharded")
    loader.reshard(remainder)
    if rank == 0:
        log.info("resharded epoch %d for %d worker(s) x batch %d (the checkpoint was taken with %d x %d): %d of "
                 "its %d samples trained, the other %d split across the new ranks, %d steps each",
                 pos.epoch + 1, world_size, batch_size, pos.world_size, pos.batch_size, used, n, n - used,
                 len(loader) - remainder.steps_done)
    return True


class StepCheckpoints:
    """After every step: the ledger's rows, and a step checkpoint (all ranks: ledger commit,
    states gathered, one report) every `checkpoint_every_steps` steps inside an epoch, or
    when the ranks agree that one of them was asked to stop (SIGTERM: `preemption`)."""

    def __init__(self, cfg, ledger, save, resumed_step: int, first_step=None) -> None:
        from orchestration.preemption import StopAgreement

        self.every, self.fail_at = cfg.checkpoint_every_steps, cfg.fail_at_step
        self.ledger, self.save, self.resumed_step = ledger, save, resumed_step
        self.first_step = first_step  # called once, after this attempt's first step
        self.stop = StopAgreement()
        self.stopping = False  # agreed at an epoch's last step: stop after its checkpoint

    def after_step(self, epoch: int, pos: Position, keys: list[str], steps_in_epoch: int) -> None:
        from orchestration.preemption import Preempted

        self.ledger.add(epoch, pos.step, keys)
        if self.first_step is not None:
            self.first_step, call = None, self.first_step
            call()
        inside = pos.epoch_step < steps_in_epoch
        if self.stop.poll():
            if not inside:
                self.stopping = True  # the epoch ends now: its own checkpoint comes first
                return
            self.save(pos, {"epoch": epoch, "step": pos.step})
            wait_until_registered()
            log.warning("preempted: step checkpoint at step %d written, stopping for a restart", pos.step)
            raise Preempted(f"SIGTERM: stopped after the checkpoint at step {pos.step}; Ray Train resumes from it")
        if self.every and pos.epoch_step % self.every == 0 and inside:
            self.save(pos, {"epoch": epoch, "step": pos.step})
            if self.fail_at and pos.step == self.fail_at and self.resumed_step < self.fail_at:
                wait_until_registered()
                raise RuntimeError(f"fail_at_step={pos.step}: injected worker failure (tests only)")


def wait_until_registered() -> None:
    """Block until Ray Train has registered every checkpoint reported so far: a worker that
    stops right after `report` could otherwise beat the registration, and the restart would
    resume from the checkpoint before."""
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
