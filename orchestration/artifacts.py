"""What training leaves behind, found and loaded for use after training: `load_trained`
turns a RUN_DIR or CHECKPOINT argument (evaluate, predict, init_from) into the checkpoint it
names, `build_trained_model` into the network it holds.

RUN_DIR is `<storage_path>/<name>` (a path or a URI): the newest checkpoint in Ray's record of
the run (`run_dir.ray_checkpoints`, as a resume would take it). CHECKPOINT is a
`checkpoint.pt` or its `epoch-NNNN/` folder. Errors are one line naming the location and
what to name instead.
"""
from __future__ import annotations

import io
import logging
from typing import Any

from torch import nn

from model.export import rebuild
from orchestration.checkpoint import FILE, load_checkpoint
from orchestration.run_dir import RAY_SNAPSHOT, ray_checkpoints
from shards.location import Location, resolve, storage_error


def find_checkpoint(target: str) -> Location:
    """The checkpoint file `target` names: itself, the `checkpoint.pt` in its folder, or a
    run directory's newest registered checkpoint."""
    loc = resolve(target)  # objects probed before folders: s3rver fails pyarrow's folder test of a run
    if (loc / FILE).is_file():
        return loc / FILE
    if (loc / RAY_SNAPSHOT).is_file():
        ray_log = logging.getLogger("ray.train")  # "A run snapshot was found in storage folder at: ..."
        level = ray_log.level
        ray_log.setLevel(logging.WARNING)
        try:
            kept = ray_checkpoints(loc)
        except OSError as err:  # Ray reads its record itself: name the run, not Ray's frames
            raise storage_error(err, loc.uri) from None
        finally:
            ray_log.setLevel(level)
        if not kept:
            raise FileNotFoundError(f"{loc}: Ray's record of this run holds no checkpoint yet; train it until an "
                                    f"epoch ends (checkpoint_every), or name a {FILE}")
        return loc / kept[-1] / FILE
    if loc.is_file():
        return loc
    if loc.is_dir():
        raise FileNotFoundError(f"{loc}: neither a run directory (no {RAY_SNAPSHOT}) nor a checkpoint folder "
                                f"(no {FILE}); name <storage_path>/<name> of a run, or an epoch-NNNN folder in it")
    raise FileNotFoundError(f"{loc}: no such run directory or checkpoint; name <storage_path>/<name> of a run, "
                            f"or a {FILE}")


def load_trained(target: str) -> tuple[str, dict[str, Any]]:
    """(the URI or path of the checkpoint file chosen, the checkpoint dict with its fixed
    keys: `model` weights, `config` of the run, ...), loaded with weights_only=True."""
    loc = find_checkpoint(target)
    source = loc.local_path() if not loc.remote else io.BytesIO(loc.read_bytes())
    try:
        state = load_checkpoint(source)
    except Exception as err:
        text = " ".join(str(err).split())
        if isinstance(err, ValueError) and "not a training checkpoint" in text:  # a torch file, other keys
            raise ValueError(f"{loc}: {text.split(': ', 1)[-1][:300]}") from None
        detail = text.split("WeightsUnpickler error: ")[-1].split(" Check the documentation")[0][:120]
        raise ValueError(f"{loc}: not a training checkpoint (torch.load with weights_only=True: "
                         f"{type(err).__name__}: {detail}); name a {FILE} that training wrote") from None
    if "model" not in state["config"]:
        raise ValueError(f"{loc}: its config names no model; not a checkpoint of this project's training")
    return loc.uri, state


def build_trained_model(state: dict[str, Any]) -> nn.Module:
    """The checkpoint's network (the registry name in its config, the classes of its fc8)
    with its weights, in eval mode, on the CPU."""
    try:
        return rebuild(state["config"]["model"], state["model"])
    except ValueError as err:
        raise ValueError(f"the checkpoint's weights: {err}") from None
