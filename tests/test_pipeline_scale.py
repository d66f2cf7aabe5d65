"""The scale tier (issue 23): a metadata-only set at ImageNet size (1,281,167 train samples in
262 tars, 50,000 val in 50), built in seconds from one small packed tar by hard links
(`helpers.scale_sets`), opened as rank 0 of 64. Bounds on what is read and parsed, never on
the clock: a rank parses the index lines of its own part only, and reads the other tars'
indexes no further than their header line."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers.scale_sets import build

import shards.index as index
from pipeline import make_loader

TRAIN, TRAIN_TARS, VAL, VAL_TARS, WORLD = 1_281_167, 262, 50_000, 50, 64
ARGS = dict(batch_size=256, device="cpu", crop_size=56, num_threads=1)


@pytest.fixture(scope="module")
def imagenet_sized(demo_shards, tmp_path_factory) -> Path:
    return build(demo_shards, tmp_path_factory.mktemp("scale") / "set",
                 {"train": (TRAIN, TRAIN_TARS), "val": (VAL, VAL_TARS)})


def read_chars() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io rchar)."""
    line = next(ln for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar"))
    return int(line.split()[1])


@pytest.mark.parametrize("split", ["train", "val"])
def test_make_loader_for_rank_0_of_64_is_o_part(imagenet_sized, split):
    make_loader(str(imagenet_sized), split, rank=1, world_size=WORLD, **ARGS)  # imports and caches warm
    lines, chars = index.LINES_PARSED[0], read_chars()
    loader = make_loader(str(imagenet_sized), split, rank=0, world_size=WORLD, **ARGS)
    parsed, read = index.LINES_PARSED[0] - lines, read_chars() - chars
    part = loader.spec.part_files(loader.spec.epoch)
    part_lines = sum(loader.spec.data.counts[i] for i, _, _ in part)
    assert loader.dataset_size == (TRAIN if split == "train" else VAL)
    assert parsed <= part_lines < loader.dataset_size / 10  # its own tars' lines, not the split's
    idx_bytes = sum(Path(loader.spec.data.indexes[i]).stat().st_size for i, _, _ in part)
    set_files = sum((imagenet_sized / f).stat().st_size for f in ("manifest.parquet", "shards.parquet"))
    tars = len(loader.spec.data.tars)
    assert read <= 2 * set_files + idx_bytes + tars * 16384 + (4 << 20), (read, idx_bytes, set_files)


def test_val_parts_of_64_ranks_sum_to_the_split_and_the_end_ranks_yield_theirs(imagenet_sized):
    sizes = [make_loader(str(imagenet_sized), "val", rank=r, world_size=WORLD, **ARGS).num_samples
             for r in range(WORLD)]
    assert sum(sizes) == VAL and max(sizes) - min(sizes) <= 1
    for rank in (0, WORLD - 1):
        loader = make_loader(str(imagenet_sized), "val", rank=rank, world_size=WORLD, **ARGS)
        assert sum(int(labels.shape[0]) for _, labels in loader) == sizes[rank]
