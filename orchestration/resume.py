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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch.distributed as dist

from orchestration.checkpoint import report, rng_state, set_rng_state
from orchestration.distributed import unwrap

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
    def of(cls, ckpt: dict[str, Any] | None) -> Position:
        if ckpt is None:
            return cls()
        if "position" in ckpt:
            return cls(**ckpt["position"])
        return cls(epoch=ckpt["epoch"])  # an epoch checkpoint without a position

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def advance(self, samples: int) -> None:
        """One step trained on `samples` (all ranks)."""
        self.step += 1
        self.epoch_step += 1
        self.samples += samples
        self.epoch_samples += samples

    def end_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_step, self.epoch_samples = epoch, 0, 0


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

    n = loader.dataset_size
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


class Saver:
    """Checkpoints of the run as it stands, every rank taking part: the ledger's rows first
    (every row of a registered checkpoint is on storage), the metrics, every rank's loader
    state and RNGs gathered to rank 0, then one `ray.train.report` (a barrier)."""

    def __init__(self, cfg, rank: int, world_size: int, model, optimizer, schedule, loader, ledger,
                 metrics) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.model, self.optimizer, self.schedule, self.loader = model, optimizer, schedule, loader
        self.ledger, self.metrics = ledger, metrics

    def save(self, at: Position, row: dict[str, Any], epoch_end: bool = False) -> None:
        self.ledger.commit()
        if self.metrics is not None:
            self.metrics.flush()
        ranks = gather_rank_states(self.rank, self.world_size, self.loader)
        at.world_size, at.batch_size = self.world_size, self.cfg.batch_size
        report(row, rank=self.rank, save=True, model=self.model, optimizer=self.optimizer,
               scheduler=self.schedule, epoch=at.epoch, config=self.cfg.to_dict(),
               step=None if epoch_end else at.step, position=at.to_dict(), ranks=ranks)

    def report(self, row: dict[str, Any], epoch: int) -> None:
        """The epoch's metrics without a checkpoint (still a barrier on every rank)."""
        report(row, rank=self.rank, save=False, model=self.model, optimizer=self.optimizer, scheduler=None,
               epoch=epoch, config={})


class Callback(Protocol):
    """Something run on every rank after each checkpoint is reported (tests inject faults so)."""

    def after_checkpoint(self, pos: Position, resumed: Position) -> None: ...


class StepHooks:
    """What happens around the steps besides training: the ledger's rows, this start's first
    step in the run book, step checkpoints every `checkpoint_every_steps` steps inside an
    epoch, epoch-end checkpoints every `checkpoint_every` epochs, and preemption: when the
    ranks agree that one of them was sent SIGTERM (`preemption`), a checkpoint at once, then
    a stop that Ray Train restarts from it."""

    def __init__(self, cfg, saver: Saver, ledger, book, resumed: Position,
                 callbacks: Sequence[Callback] = ()) -> None:
        from orchestration.preemption import StopAgreement

        self.cfg, self.saver, self.ledger, self.book = cfg, saver, ledger, book
        self.resumed = Position(**resumed.to_dict())
        self.callbacks = tuple(callbacks)
        self.stop = StopAgreement()
        self.stopping = False  # agreed at an epoch's last step: stop after its checkpoint

    def after_step(self, epoch: int, pos: Position, keys: list[str], steps_in_epoch: int) -> None:
        self.ledger.add(epoch, pos.step, keys)
        self.book.first_step()
        inside = pos.epoch_step < steps_in_epoch
        if self.stop.poll():
            if not inside:
                self.stopping = True  # the epoch ends now: its own checkpoint comes first
                return
            self._checkpoint(pos, {"epoch": epoch, "step": pos.step})
            self._preempted(f"step {pos.step}")
        every = self.cfg.checkpoint_every_steps
        if every and pos.epoch_step % every == 0 and inside:
            self._checkpoint(pos, {"epoch": epoch, "step": pos.step})

    def after_epoch(self, epoch: int, pos: Position, row: dict[str, Any]) -> None:
        """`pos` stands at the end of `epoch`; `row` is the epoch's figures (Ray's metrics)."""
        if self.stopping or epoch % self.cfg.checkpoint_every == 0 or epoch == self.cfg.epochs:
            self._checkpoint(pos, row, epoch_end=True)
        else:
            self.saver.report(row, epoch)
        self.book.bank_time()
        if self.stopping:
            self._preempted(f"epoch {epoch}")

    def _checkpoint(self, pos: Position, row: dict[str, Any], epoch_end: bool = False) -> None:
        self.saver.save(pos, row, epoch_end=epoch_end)
        for callback in self.callbacks:
            callback.after_checkpoint(pos, self.resumed)

    def _preempted(self, where: str) -> None:
        from orchestration.preemption import Preempted

        wait_until_registered()
        log.warning("preempted: checkpoint at the end of %s written, stopping for a restart", where)
        raise Preempted(f"SIGTERM: stopped after the checkpoint at {where}; Ray Train resumes from it")


def restore(ckpt: dict[str, Any] | None, rank: int, world_size: int, batch_size: int, model, optimizer,
            schedule, loader) -> bool:
    """Put everything where the checkpoint left it: weights, optimizer, schedule, then (last:
    building the model draws from the RNGs) this rank's loader and RNGs. True when the loader
    continues its epoch mid-way, False when the epoch's data starts afresh."""
    if ckpt is None:
        return False
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    return restore_rank_state(ckpt, rank, world_size, batch_size, loader)


def wait_until_registered() -> None:
    """Block until Ray Train has registered every checkpoint reported so far: a worker that
    stops right after `report` could otherwise beat the registration, and the restart would
    resume from the checkpoint before."""
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def start_from(model, target: str) -> str:
    """`init_from`: the weights of a trained checkpoint (a file, its folder or a run directory,
    local or a URI) copied into a fresh `model`, every tensor whose name and shape match;
    the rest (a classifier for another number of classes) keeps its initialisation. Returns
    a line saying what was taken. Only the weights: optimizer, schedule and data start anew."""
    from orchestration.artifacts import load_trained

    source, state = load_trained(target)
    mine = unwrap(model).state_dict()
    taken = {k: v for k, v in state["model"].items() if k in mine and mine[k].shape == v.shape}
    if not taken:
        raise ValueError(f"init_from: {source}: none of its tensors fit {state['config'].get('model')!r} "
                         f"weights into this model; is it a checkpoint of the same network?")
    unwrap(model).load_state_dict(taken, strict=False)
    left = sorted(set(mine) - set(taken))
    return (f"init_from {source}: {len(taken)} of {len(mine)} tensors"
            + (f"; kept fresh: {', '.join(left)}" if left else ""))
