"""alexnet-bn, the variant the CPU demo trains, learns quickly and stably at a small crop."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model import build_model

CLASSES = 4


def stripes(n: int, crop: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sine gratings whose orientation (0, 45, 90, 135 degrees) is the label.

    The label lives in a spatial pattern at random phase, not in a colour or mean, so
    only the convolutions can solve it.
    """
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(crop), torch.arange(crop), indexing="ij")
    angle = labels.float() * math.pi / CLASSES
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    phase = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi
    img = torch.sin(proj * (2 * math.pi / 8) + phase)[:, None].expand(n, 3, crop, crop)
    return img + 0.5 * torch.randn(n, 3, crop, crop, generator=gen), labels


def test_bn_variant_learns_at_64px() -> None:
    torch.manual_seed(0)
    model = build_model("alexnet-bn", num_classes=CLASSES).train()
    # the paper's optimiser settings (SGD, lr 0.01, momentum 0.9, weight decay 5e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(12):
        x, y = stripes(24, 64, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert max(losses) < 3 * math.log(CLASSES), f"unstable: {losses}"  # no blow-up on the way
    assert sum(losses[-4:]) / 4 < 0.3 * math.log(CLASSES), losses
    # held-out accuracy with batch statistics: after 12 steps BN's running averages (momentum
    # 0.1) still carry 28% of their initial values, which a real run's epochs wash out
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
    x, y = stripes(64, 64, torch.Generator().manual_seed(2))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.6, f"held-out accuracy {accuracy:.2f} (chance {1 / CLASSES:.2f})"
