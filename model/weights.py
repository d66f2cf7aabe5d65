"""Loading weights safely (`weights_only=True`) from a state_dict or a checkpoint."""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# Wrappers that rename parameters: DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
# Checkpoint dicts that hold the state_dict under one of these keys (orchestration writes `model`).
_NESTED_KEYS = ("model", "state_dict")


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: holds no state_dict (expected a dict of tensors, or one under 'model'/'state_dict')")
    return {_strip(k): v for k, v in obj.items()}


def _strip(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key.replace("._orig_mod.", ".")


def _short(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `path` into `model` strictly and return it.

    Accepts a bare state_dict or a checkpoint dict holding one under `model` or
    `state_dict`; strips DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes. Files
    that need arbitrary code to unpickle are refused, and any key or shape disagreement
    is reported in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: refused: it needs more than tensors to unpickle (weights_only=True; {first[:200]})"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a torch weights file ({str(err).splitlines()[0][:200]})") from None
    state = _state_dict_of(obj, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state) if state[k].shape != own[k].shape
    )
    problems = [
        f"{label}: {_short(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if names
    ]
    if problems:
        raise ValueError(f"{path}: does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model
