"""What the loop sums between two logged steps (`Window`) and over an epoch (`Totals`).

Per rank, the loss sum stays on the device until a logged step reads it (no host-device
sync on the other steps); counts and seconds are host numbers. At a logged step the ranks
sum their windows with one all_reduce, and the epoch's totals add up those sums.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field

import torch


@dataclass
class Totals:
    """Sums over all ranks: loss x samples, samples, seconds blocked on the loader, step seconds."""

    loss_sum: float = 0.0
    samples: float = 0.0
    wait_s: float = 0.0
    step_s: float = 0.0

    def add(self, other: Totals) -> None:
        self.loss_sum += other.loss_sum
        self.samples += other.samples
        self.wait_s += other.wait_s
        self.step_s += other.step_s

    def rates(self, world_size: int) -> dict[str, float]:
        """loss (mean per sample), images/s of all ranks, data-wait share of the step time."""
        mean_step_s = self.step_s / world_size  # ranks run in lock-step under DDP
        return {"loss": self.loss_sum / max(self.samples, 1),
                "images_per_s": self.samples / mean_step_s if mean_step_s else 0.0,
                "data_wait": self.wait_s / self.step_s if self.step_s else 0.0}

    def as_list(self) -> list[float]:
        return list(astuple(self))


@dataclass
class Window:
    """One rank's steps since the last logged one."""

    device: torch.device
    loss: torch.Tensor = field(init=False)
    images: int = 0
    steps: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0

    def __post_init__(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, loss: torch.Tensor, images: int, wait_s: float) -> None:
        self.loss += loss.detach().double() * images
        self.images += images
        self.steps += 1
        self.wait_s += wait_s

    def totals(self) -> Totals:
        """This rank's sums (reads the loss back from the device: a sync)."""
        return Totals(self.loss.item(), float(self.images), self.wait_s, self.step_s)

    def reset(self) -> None:
        self.loss.zero_()
        self.images = self.steps = 0
        self.wait_s = self.step_s = 0.0
