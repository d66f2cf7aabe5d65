"""`build_pipeline`: the built DALI pipeline of one rank's part of one epoch, and the part
indexes that restrict DALI's reader to that part.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline.spec import LoaderSpec
from shards.index import read_index, write_entries


def build_pipeline(spec: LoaderSpec, epoch: int, part_dir: Path | None = None,
                   checkpoint: str | None = None, skip: set[str] | None = None) -> nvidia.dali.Pipeline:  # noqa: F821
    """The built DALI pipeline that reads `epoch` of `spec` (the loader's, the tuning probes'
    and the benchmarks').

    The reader is handed exactly this rank's part: the tars it touches, in the epoch's
    order, with the first and last one's index cut to the part's samples (written into
    `part_dir`), as one DALI shard. The tars outside the part need not be on this node.
    `skip`: keys left out (the rest of a pass after corrupt samples; reseeded)."""
    from pipeline import dali

    tars, indexes = [], []
    for i, first, end in spec.part_files(epoch):
        idx = spec.data.indexes[i]
        done = spec.done_rows(epoch, i)  # a resharded epoch: what the steps before the resize took
        if skip or done or (first, end) != (0, spec.data.counts[i]):
            part_dir = part_dir or Path(tempfile.mkdtemp(prefix="alexnet-part-"))
            tag = (f"-skip{len(skip)}" if skip else "") + (f"-w{spec.world_size}-s{spec.remainder.steps_done}"
                                                          if spec.resharded(epoch) else "")
            idx = write_part_index(idx, first, end, part_dir / f"e{epoch}-r{spec.rank}-t{i}{tag}.idx", skip, done)
            if idx is None:
                continue
        tars.append(str(spec.data.tars[i]))
        indexes.append(str(idx))
    common = dict(
        tars=tars, indexes=indexes, shard_id=0, num_shards=1,
        device="gpu" if spec.device == "cuda" else "cpu", crop_size=spec.crop_size,
        resize_to=spec.resize_to, mean=[255 * m for m in spec.stats.mean],
        std=[255 * s for s in spec.stats.std], dtype=spec.dtype,
        batch_size=spec.batch_size, num_threads=spec.num_threads,
        device_id=device_id(spec), seed=spec.epoch_seed(epoch) + (len(skip) if skip else 0),
        prefetch_queue_depth=spec.prefetch, hw_decoder_load=spec.hw_decoder_load,
    )
    if spec.train:
        pipe = dali.train_pipeline(
            **common, crop=spec.crop, rrc_scale=spec.rrc_scale,
            lighting_matrix=spec.stats.lighting_matrix() if spec.lighting else None,
            initial_fill=spec.shuffle_buffer, enable_checkpointing=True, checkpoint=checkpoint,
        )
    elif spec.ten_crop:
        pipe = dali.ten_crop_pipeline(**common)
    else:
        pipe = dali.val_pipeline(**common)
    pipe.build()
    return pipe


def write_part_index(idx: Path, first: int, end: int, out: Path, skip: set[str] | None = None,
                     drop_rows: set[int] | None = None) -> Path | None:
    """An index listing only samples [first, end) of `idx`, less the keys in `skip` and the
    rows (of the whole index) in `drop_rows`: DALI's reader then reads exactly those (how a
    rank's reader is restricted to its part of the epoch). None when nothing is left."""
    rows = enumerate(read_index(idx, first, end), start=first)
    entries = [e for j, e in rows if not (drop_rows and j in drop_rows) and not (skip and e.key in skip)]
    return write_entries(out, entries) if entries else None


def device_id(spec: LoaderSpec) -> int | None:
    """DALI's CUDA device of `spec` (None on the CPU)."""
    if spec.device != "cuda":
        return None
    if spec.device_id is not None:
        return int(spec.device_id)
    return torch.cuda.current_device()  # a logical index: what Ray's CUDA_VISIBLE_DEVICES needs
