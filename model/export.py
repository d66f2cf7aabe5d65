"""A trained network in three forms outside this project: weights, TorchScript, ONNX.

- `weights`: `torch.save` of one dict, loadable with `torch.load(path, weights_only=True)`:

      {"format": "alexnet-weights/1",
       "model": "alexnet-bn",          # the registry name (model.registry.MODEL_NAMES)
       "num_classes": 10,
       "crop_size": 96,                # the side the network was trained and evaluated at
       "epoch": 6,                     # epochs completed when the checkpoint was written
       "source": ".../epoch-0006/checkpoint.pt",
       "state_dict": {name: tensor}}   # the model's weights alone (no optimizer momentum)

  `load_exported(path)` rebuilds the model from it; `model.load_weights(build_model(name, n),
  path)` loads it too (it finds `state_dict`).
- `torchscript`: `torch.jit.script` of the model in eval mode; `torch.jit.load` runs it without
  this code, at any crop of at least `MIN_CROP`.
- `onnx`: the torch.export-based exporter at one crop (the training crop by default), the batch
  dimension dynamic: input `images` [N, 3, crop, crop] (normalised like val), output `logits`
  [N, classes]. Before export the adaptive 6x6 pool becomes `FixedPool`: the same averaging
  windows for that crop as two constant matrices, which every exporter takes (the TorchScript
  exporter refuses adaptive pooling to a size that does not divide the input: 2x2 -> 6x6 at
  crop 96). Needs the `export` extra (onnx, onnxscript; onnxruntime checks the logits).

`python -m model export` (model/__main__.py) reads a local checkpoint written by training
(`read_checkpoint`): a `checkpoint.pt`, its folder, or a run folder (its newest `epoch-*`).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.registry import MODEL_NAMES, build_model

FORMATS = ("weights", "torchscript", "onnx")
WEIGHTS_FORMAT = "alexnet-weights/1"
CHECKPOINT_FILE = "checkpoint.pt"  # what training writes into each epoch-NNNN/ folder of a run


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The classes of a state_dict: the rows of its last 2-D weight (fc8, or torchvision's
    classifier.6)."""
    last = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    if not last:
        raise ValueError("the state_dict holds no fully connected layer to read the number of classes from")
    return int(last[-1].shape[0])


def rebuild(name: str, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The registry's `name` with these weights (strict), in eval mode, on the CPU."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model {name!r} is not in this project's registry ({', '.join(MODEL_NAMES)})")
    model = build_model(name, num_classes_of(state_dict))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"the weights do not fit {name!r}: {' '.join(str(err).split())[:300]}") from None
    return model.eval()


def read_checkpoint(target: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A training checkpoint on this machine, loaded with weights_only=True: `target` is a
    checkpoint file, its folder, or a run folder (the newest of its `epoch-*` folders: the
    names sort in training order). Returns the file and the checkpoint dict."""
    text = os.fspath(target)
    if "://" in text:
        raise ValueError(f"{text}: python -m model export reads a local checkpoint; copy it here first "
                         f"(e.g. aws s3 cp {text.rstrip('/')}/epoch-NNNN/{CHECKPOINT_FILE} .)")
    path = Path(text).expanduser()
    if path.is_dir() and not (path / CHECKPOINT_FILE).is_file():
        kept = sorted(d for d in path.glob("epoch-*") if (d / CHECKPOINT_FILE).is_file())
        if not kept:
            raise FileNotFoundError(f"{path}: no {CHECKPOINT_FILE} there and no epoch-*/{CHECKPOINT_FILE} under it; "
                                    f"name a run directory that saved a checkpoint, or a checkpoint file")
        path = kept[-1]
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; name a run directory or a {CHECKPOINT_FILE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, not a torch file, truncated
        raise ValueError(f"{path}: not a training checkpoint ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:160]})") from None
    if not (isinstance(state, dict) and isinstance(state.get("model"), Mapping)
            and isinstance(state.get("config"), Mapping) and "model" in state["config"]):
        raise ValueError(f"{path}: not a training checkpoint (no 'model' weights with a 'config' naming the "
                         f"model); python -m model export takes what training wrote")
    return path, state


# ------------------------------------------------------------------------------ weights
def save_weights(out: str | os.PathLike, name: str, state_dict: Mapping[str, torch.Tensor], *,
                 crop_size: int, epoch: int | None = None, source: str | None = None) -> None:
    """The weights file (see the module doc), written whole or not at all."""
    payload = {"format": WEIGHTS_FORMAT, "model": name, "num_classes": num_classes_of(state_dict),
               "crop_size": int(crop_size), "epoch": epoch, "source": source,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    _write(out, lambda tmp: torch.save(payload, tmp))


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A weights file back as (model in eval mode, its metadata without the state_dict)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a weights file of python -m model export (format {WEIGHTS_FORMAT})")
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return rebuild(obj["model"], obj["state_dict"]), meta


# -------------------------------------------------------------------------- torchscript
def save_torchscript(model: nn.Module, out: str | os.PathLike) -> None:
    """`torch.jit.script` of `model` in eval mode (its own copy: `model` is left as it was)."""
    scripted = torch.jit.script(copy.deepcopy(model).eval())
    _write(out, lambda tmp: torch.jit.save(scripted, str(tmp)))


# --------------------------------------------------------------------------------- onnx
def pool_matrix(size: int, out: int) -> torch.Tensor:
    """[out, size]: row i averages input positions floor(i*size/out) .. ceil((i+1)*size/out) - 1,
    the windows of torch's adaptive average pooling."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, math.ceil((i + 1) * size / out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class FixedPool(nn.Module):
    """`AdaptiveAvgPool2d(out)` for one input size (h, w): rows @ x @ cols^T. Where out is a
    multiple of the input (the upsampling of small crops) every row holds one 1: the outputs
    equal torch's bit for bit."""

    def __init__(self, h: int, w: int, out: int) -> None:
        super().__init__()
        self.register_buffer("rows", pool_matrix(h, out), persistent=False)
        self.register_buffer("cols", pool_matrix(w, out).t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


def with_fixed_pool(model: nn.Module, crop_size: int) -> nn.Module:
    """A copy of `model` (eval mode) whose adaptive pool is a `FixedPool` for `crop_size`."""
    model = copy.deepcopy(model).eval()
    pool = model.avgpool
    seen: list[torch.Size] = []
    handle = pool.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, crop_size, crop_size))
    handle.remove()
    out = pool.output_size if isinstance(pool.output_size, int) else pool.output_size[0]
    model.avgpool = FixedPool(int(seen[0][-2]), int(seen[0][-1]), int(out))
    return model


def save_onnx(model: nn.Module, out: str | os.PathLike, crop_size: int) -> None:
    """The ONNX graph of `model` at `crop_size` (batch dynamic), through torch.onnx's
    torch.export-based exporter; ValueError naming the extra when onnxscript is missing."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ValueError("--format onnx needs the exporter's packages: pip install -e '.[export]' "
                         "(onnx, onnxscript, onnxruntime)") from None
    ready = with_fixed_pool(model, crop_size)
    example = torch.zeros(2, 3, crop_size, crop_size)

    def export(tmp: Path) -> None:
        quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping torchvision::nms", ...
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations
                program = torch.onnx.export(ready, (example,), input_names=["images"], output_names=["logits"],
                                            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                                            verbose=False)
        finally:
            quiet.setLevel(level)
        program.save(str(tmp))

    _write(out, export)


def _write(out: str | os.PathLike, write) -> None:
    """`write(tmp)` under a temp name beside `out`, then a rename: `out` is whole or absent."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export(model: nn.Module, name: str, out: str | os.PathLike, fmt: str, *, crop_size: int,
           epoch: int | None = None, source: str | None = None) -> None:
    """`model` (the registry's `name`, trained at `crop_size`) written to `out` as `fmt`."""
    if fmt == "weights":
        save_weights(out, name, model.state_dict(), crop_size=crop_size, epoch=epoch, source=source)
    elif fmt == "torchscript":
        save_torchscript(model, out)
    elif fmt == "onnx":
        save_onnx(model, out, crop_size)
    else:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
