"""Model names -> constructors (the contract's `build_model`)."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.alexnet import AlexNet, AlexNetConfig, TorchvisionAlexNet

_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "alexnet": lambda n: AlexNet(AlexNetConfig(num_classes=n, groups=2, norm="lrn", init="paper")),
    "alexnet-1gpu": lambda n: AlexNet(AlexNetConfig(num_classes=n, groups=1, norm="lrn", init="paper")),
    "alexnet-torchvision": lambda n: TorchvisionAlexNet(num_classes=n),
    "alexnet-bn": lambda n: AlexNet(AlexNetConfig(num_classes=n, groups=2, norm="bn", init="kaiming")),
    # alexnet-bn's layers at 1/16 width (482,342 parameters at 1000 classes, 227,912 at 10): smoke runs and tests that
    # exercise training mechanics (resume, faults, elastic), where the network is not under test
    "alexnet-tiny": lambda n: AlexNet(AlexNetConfig(num_classes=n, groups=2, norm="bn", init="kaiming",
                                                    width=1 / 16)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    """A freshly initialised model of the named variant."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _BUILDERS[name](num_classes)
