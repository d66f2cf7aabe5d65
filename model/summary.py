"""Per-layer table of a model: output shape, parameters, multiply-accumulates per image."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Layers that neither hold parameters nor change the shape add only noise to the table.
_SKIP = (nn.ReLU, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]  # without the batch dimension
    params: int
    macs: int  # multiply-accumulates per image (conv and linear layers only)


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    per_image = out[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


def summarize(model: nn.Module, crop: int = 224) -> list[LayerRow]:
    """Run one `crop`x`crop` image through `model` (eval mode, no grad) and tabulate it."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in model.named_modules():
        if list(module.children()) or isinstance(module, _SKIP):
            continue

        def hook(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            params = sum(p.numel() for p in mod.parameters())
            rows.append(LayerRow(name, type(mod).__name__, tuple(out.shape[1:]), params, _macs(mod, out)))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, crop, crop))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def format_table(rows: list[LayerRow], total_params: int) -> str:
    """The table as text, with totals (params over the whole model, MACs per image)."""
    lines = [f"{'layer':<14}{'type':<20}{'output':>18}{'params':>14}{'MACs':>16}"]
    for r in rows:
        shape = "x".join(str(d) for d in r.output_shape)
        lines.append(f"{r.name:<14}{r.kind:<20}{shape:>18}{r.params:>14,}{r.macs:>16,}")
    lines.append(f"{'total':<14}{'':<20}{'':>18}{total_params:>14,}{sum(r.macs for r in rows):>16,}")
    return "\n".join(lines)
