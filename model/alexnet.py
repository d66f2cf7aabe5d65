"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) and torchvision's single-tower layout.

`AlexNet` follows the paper's table (shared/ALEXNET.md) layer by layer; `AlexNetConfig`
alone sizes it (groups, LRN or BatchNorm, init). `TorchvisionAlexNet` keeps torchvision's
module names so its checkpoints load with `strict=True`. Both end in an adaptive 6x6 pool
before fc6, so crops smaller than 224 (down to `MIN_CROP`) run through the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# The paper's local response normalisation constants (section 3.3).
LRN_K = 2.0
LRN_N = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.75

# Smallest square input whose feature map survives the three 3/2 max-pools.
MIN_CROP = 63


def paper_lrn() -> nn.LocalResponseNorm:
    """LRN with the paper's formula.

    torch divides alpha by `size` (it averages the squares instead of summing them), so
    the paper's alpha is multiplied by n here; the zero padding at the channel edges makes
    the sum run over max(0, i-n/2)..min(N-1, i+n/2) exactly as the paper writes it.
    """
    return nn.LocalResponseNorm(size=LRN_N, alpha=LRN_ALPHA * LRN_N, beta=LRN_BETA, k=LRN_K)


@dataclass(frozen=True)
class AlexNetConfig:
    """Everything that sizes an `AlexNet`."""

    num_classes: int = 1000
    groups: int = 2  # 2: the paper's two towers on conv2/4/5; 1: one tower
    norm: Literal["lrn", "bn"] = "lrn"
    dropout: float = 0.5
    init: Literal["paper", "kaiming"] = "paper"
    width: float = 1.0  # scales every conv's channels and fc6/fc7's units (1: the paper's)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.groups not in (1, 2):
            raise ValueError(f"groups must be 1 or 2, got {self.groups}")
        if self.norm not in ("lrn", "bn"):
            raise ValueError(f"norm must be 'lrn' or 'bn', got {self.norm!r}")
        if self.init not in ("paper", "kaiming"):
            raise ValueError(f"init must be 'paper' or 'kaiming', got {self.init!r}")
        if not 0 < self.width <= 1 or any(self.channels(c) % self.groups for c in (96, 256, 384)):
            raise ValueError(f"width must be in (0, 1] and keep every conv's channels divisible by groups, "
                             f"got {self.width}")

    def channels(self, paper: int) -> int:
        """A layer's channels (or fc units) at this width."""
        return max(1, round(paper * self.width))


def check_input(x: torch.Tensor, min_crop: int) -> None:
    """ValueError for an input below the smallest crop (`min_crop` is passed in: TorchScript
    does not read module globals)."""
    h, w = x.shape[-2], x.shape[-1]
    if h < min_crop or w < min_crop:
        raise ValueError(f"AlexNet needs inputs of at least {min_crop}x{min_crop}, got ({h}, {w})")


class AlexNet(nn.Module):
    """The paper's AlexNet; `forward` returns logits (softmax lives in the loss).

    `forward` is scriptable (`torch.jit.script`): it reads only `Final` attributes, never the
    module globals or `config` (TorchScript constants, set in `__init__`).
    """

    __constants__ = ["min_crop", "batch_norm"]

    def __init__(self, config: AlexNetConfig = AlexNetConfig()) -> None:
        super().__init__()
        self.config = config
        g, bn = config.groups, config.norm == "bn"
        self.min_crop, self.batch_norm = MIN_CROP, bn
        c1, c2, c3, c4, c5 = (config.channels(c) for c in (96, 256, 384, 384, 256))
        fc = config.channels(4096)
        # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=2, bias=not bn)
        self.norm1 = nn.BatchNorm2d(c1) if bn else paper_lrn()
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, groups=g, bias=not bn)
        self.norm2 = nn.BatchNorm2d(c2) if bn else paper_lrn()
        self.pool2 = nn.MaxPool2d(3, stride=2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=not bn)  # sees both towers
        self.norm3 = nn.BatchNorm2d(c3) if bn else nn.Identity()
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, groups=g, bias=not bn)
        self.norm4 = nn.BatchNorm2d(c4) if bn else nn.Identity()
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, groups=g, bias=not bn)
        self.norm5 = nn.BatchNorm2d(c5) if bn else nn.Identity()
        self.pool5 = nn.MaxPool2d(3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(6)  # identity at 224; lets small crops through
        self.fc6 = nn.Linear(c5 * 6 * 6, fc, bias=not bn)
        self.norm6 = nn.BatchNorm1d(fc) if bn else nn.Identity()
        self.drop6 = nn.Dropout(config.dropout)
        self.fc7 = nn.Linear(fc, fc, bias=not bn)
        self.norm7 = nn.BatchNorm1d(fc) if bn else nn.Identity()
        self.drop7 = nn.Dropout(config.dropout)
        self.fc8 = nn.Linear(fc, config.num_classes)
        self.relu = nn.ReLU(inplace=True)
        if config.init == "paper":
            init_paper(self)
        else:
            init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.min_crop)
        # The paper normalises (LRN) after the ReLU; BatchNorm goes between conv and ReLU.
        bn = self.batch_norm
        x = self.conv1(x)
        x = self.pool1(self.relu(self.norm1(x)) if bn else self.norm1(self.relu(x)))
        x = self.conv2(x)
        x = self.pool2(self.relu(self.norm2(x)) if bn else self.norm2(self.relu(x)))
        x = self.relu(self.norm3(self.conv3(x)))  # norm3-5: BatchNorm, or Identity with LRN
        x = self.relu(self.norm4(self.conv4(x)))
        x = self.pool5(self.relu(self.norm5(self.conv5(x))))
        x = torch.flatten(self.avgpool(x), 1)
        x = self.drop6(self.relu(self.norm6(self.fc6(x))))
        x = self.drop7(self.relu(self.norm7(self.fc7(x))))
        return self.fc8(x)


def init_paper(model: AlexNet) -> None:
    """Section 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0."""
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, module in model.named_children():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                nn.init.constant_(module.bias, 1.0 if name in ones else 0.0)


def init_kaiming(model: AlexNet) -> None:
    """He init for the ReLU layers, N(0, 0.01) for fc8, BN at weight 1 / bias 0.

    N(0, 0.01) through five convs and two fcs shrinks activations layer after layer, which
    trains slowly from scratch at small crops; the BatchNorm variant uses this instead.
    """
    for name, module in model.named_children():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            if name == "fc8":
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class TorchvisionAlexNet(nn.Module):
    """torchvision's AlexNet layout (64-192-384-256-256, no LRN, adaptive 6x6 average pool).

    Module names and indices match torchvision's, so its state_dict keys
    (`features.0.weight` ... `classifier.6.bias`) and shapes are identical. Init is torch's
    default, as in torchvision.
    """

    __constants__ = ["min_crop"]

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.min_crop = MIN_CROP
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.min_crop)
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)
