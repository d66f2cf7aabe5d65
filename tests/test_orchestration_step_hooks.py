"""The step hooks' decisions, inside a real Ray Train context (local mode, in process): when a
checkpoint is written, and what preemption does at an epoch's end. The saver records what it
is asked to save instead of training a model; the rest is the product's code."""
from __future__ import annotations

import pytest
from torch import nn

from orchestration.config import from_dict
from orchestration.preemption import Preempted
from orchestration.resume import Position, StepHooks
from orchestration.train import make_optimizer


class RecordingSaver:
    def __init__(self) -> None:
        self.saved: list[tuple[int, int, bool]] = []
        self.reported: list[int] = []

    def save(self, at: Position, row: dict, epoch_end: bool = False) -> None:
        self.saved.append((at.epoch, at.step, epoch_end))

    def report(self, row: dict, epoch: int) -> None:
        self.reported.append(epoch)


class NoLedger:
    def add(self, *args) -> None:
        pass


class Book:
    banked = 0

    def first_step(self) -> None:
        pass

    def bank_time(self) -> None:
        self.banked += 1


def config(**values):
    return from_dict({"name": "t", "storage_path": "/tmp/r", "shards_dir": "/tmp/s", "model": "alexnet-tiny",
                      "epochs": 4, "batch_size": 8, "workers": 1, "use_gpu": False, **values})


def in_ray_train(fn):
    """Run `fn` as a Ray Train function in this process (local mode) and return what it returned."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(fn, scaling_config=ray.train.ScalingConfig(num_workers=0)).fit().return_value


def test_epoch_end_checkpoints_every_checkpoint_every_epochs_and_at_the_last():
    def run():
        saver, book = RecordingSaver(), Book()
        hooks = StepHooks(config(checkpoint_every=3), saver, NoLedger(), book, resumed=Position())
        for epoch in range(1, 5):
            hooks.after_epoch(epoch, Position(epoch=epoch, step=10 * epoch), {})
        return saver.saved, saver.reported, book.banked

    saved, reported, banked = in_ray_train(run)
    assert saved == [(3, 30, True), (4, 40, True)] and reported == [1, 2] and banked == 4


def test_preemption_at_an_epoch_end_writes_that_epochs_checkpoint_even_off_schedule():
    """Agreed at the last step of epoch 1 (checkpoint_every=3 would skip it): the checkpoint is
    written anyway, then the workers stop for Ray Train to restart from it."""
    def run():
        saver = RecordingSaver()
        hooks = StepHooks(config(checkpoint_every=3), saver, NoLedger(), Book(), resumed=Position())
        hooks.stopping = True
        with pytest.raises(Preempted, match="epoch 1"):
            hooks.after_epoch(1, Position(epoch=1, step=10), {})
        return saver.saved, saver.reported

    assert in_ray_train(run) == ([(1, 10, True)], [])


def test_step_checkpoints_every_n_steps_inside_an_epoch_only():
    def run():
        saver = RecordingSaver()
        hooks = StepHooks(config(checkpoint_every_steps=2), saver, NoLedger(), Book(), resumed=Position())
        pos = Position()
        for _ in range(5):  # an epoch of 5 steps: checkpoints at 2 and 4; 5 ends the epoch
            pos.advance(8)
            hooks.after_step(1, pos, [], steps_in_epoch=5)
        return saver.saved

    assert in_ray_train(run) == [(0, 2, False), (0, 4, False)]


@pytest.mark.parametrize("norm,bias_decay", [(nn.BatchNorm2d, 0.0), (lambda c: nn.LocalResponseNorm(5), 5e-4)])
def test_no_weight_decay_on_biases_and_norms_only_in_batchnorm_networks(norm, bias_decay):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4))
    groups = make_optimizer(config(weight_decay=5e-4), model).param_groups
    assert groups[0]["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == bias_decay and all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
