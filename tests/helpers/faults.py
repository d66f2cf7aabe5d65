"""Faults the tests inject into a training run: callbacks that `train_worker` runs on every
rank after each checkpoint is reported (`orchestration.resume.Callback`), passed as
`train.main(argv, callbacks=[FailAt(...)])`. Nothing of this is in the product's config.

Ray ships a callback to its workers by pickling; these classes are pickled by value (this
module is not importable on a Ray worker, whose path holds the project but not tests/).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from orchestration.resume import Position, wait_until_registered


@dataclass(frozen=True)
class FailAt:
    """Every rank raises once, right after the checkpoint at global `step` or at the end of
    `epoch` is registered; a restart that resumed at or past that point does not fail again."""

    epoch: int = 0
    step: int = 0

    def after_checkpoint(self, pos: Position, resumed: Position) -> None:
        at_step = self.step and pos.step == self.step and resumed.step < self.step
        at_epoch = self.epoch and pos.epoch == self.epoch and pos.epoch_step == 0 and resumed.epoch < self.epoch
        if at_step or at_epoch:
            wait_until_registered()  # else the restart could beat the registration and resume earlier
            where = f"step {pos.step}" if at_step else f"epoch {pos.epoch}"
            raise RuntimeError(f"injected worker failure after the checkpoint at {where} (tests only)")


def _ship_by_value() -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


_ship_by_value()
