"""The scale tier (issue 23): a metadata-only set at ImageNet size (1,281,167 train samples in
262 tars, 50,000 val in 50), built in seconds from one small packed tar by hard links
(`helpers.scale_sets`), opened as rank 0 of 64. Bounds on what is read, opened and held,
never on the clock: a rank parses the index lines of its own part only and opens no other
tar's files (their counts come from shards.parquet); its loader state is O(part); a state
saved at 64 ranks reshards to 48 with every sample once; anonymous memory stays flat over
many batches; the audit's memory is one epoch's, whatever the ledger holds; verify's memory is
flat in the manifest's rows."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers.scale_sets import build

import shards.index as index
from pipeline import make_loader
from pipeline.remainder import positions_bytes, remainder_of
from pipeline.usage import resident_split_mib

TRAIN, TRAIN_TARS, VAL, VAL_TARS, WORLD = 1_281_167, 262, 50_000, 50, 64
ARGS = dict(batch_size=256, device="cpu", crop_size=56, num_threads=1)
OPENED: list[str] = []  # paths opened through Python while `_counting` is set (sys.addaudithook)
_counting = [False]


def _audit(event: str, args: tuple) -> None:
    if _counting[0] and event == "open" and isinstance(args[0], (str, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # a hook stays for the process: it counts only while a test sets _counting


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
    # the set files (pyarrow reads manifest columns and shards.parquet), its own indexes, and no
    # other tar's index or header: the counts come from shards.parquet
    assert read <= 2 * set_files + idx_bytes + len(part) * 16384 + (1 << 20), (read, idx_bytes, set_files)


@pytest.mark.parametrize("split", ["train", "val"])
def test_files_opened_by_rank_0_of_64_are_its_part(imagenet_sized, split):
    """Files opened through Python (the audit hook's "open" events: open(), os.open; the
    C++ opens of pyarrow and DALI are not seen, and make_loader's DALI pipeline is built at
    the first pass): at most its own tars and indexes, and the set's small files."""
    make_loader(str(imagenet_sized), split, rank=1, world_size=WORLD, **ARGS)
    OPENED.clear()
    _counting[0] = True
    try:
        loader = make_loader(str(imagenet_sized), split, rank=0, world_size=WORLD, **ARGS)
    finally:
        _counting[0] = False
    mine = {Path(loader.spec.data.tars[i]).stem for i, _, _ in loader.spec.part_files(loader.spec.epoch)}
    in_set = [Path(p) for p in OPENED if str(imagenet_sized) in p]
    shard_files = [p for p in in_set if p.suffix in (".idx", ".tar")]
    assert {p.stem for p in shard_files} <= mine, sorted(shard_files)
    assert len(in_set) - len(shard_files) <= 4, in_set  # stats.json, classes.json, ...
    assert len(mine) < len(loader.spec.data.tars) / 10


def test_val_parts_of_64_ranks_sum_to_the_split_and_the_end_ranks_yield_theirs(imagenet_sized):
    sizes = [make_loader(str(imagenet_sized), "val", rank=r, world_size=WORLD, **ARGS).num_samples
             for r in range(WORLD)]
    assert sum(sizes) == VAL and max(sizes) - min(sizes) <= 1
    for rank in (0, WORLD - 1):
        loader = make_loader(str(imagenet_sized), "val", rank=rank, world_size=WORLD, **ARGS)
        assert sum(int(labels.shape[0]) for _, labels in loader) == sizes[rank]


@pytest.fixture(scope="module")
def tenth_sized(demo_shards, tmp_path_factory) -> Path:
    return build(demo_shards, tmp_path_factory.mktemp("scale") / "tenth",
                 {"train": (TRAIN // 10, TRAIN_TARS // 10), "val": (VAL // 10, VAL_TARS // 10)})


def _state_after(path: Path, steps: int, rank: int = 0, world_size: int = WORLD):
    loader = make_loader(str(path), "train", rank=rank, world_size=world_size, return_keys=True, **ARGS)
    it = iter(loader)
    for _ in range(steps):
        next(it)
    return loader, loader.state_dict()


def test_loader_state_is_o_part_not_o_split(imagenet_sized, tenth_sized):
    """The checkpointable state of rank 0 of 64 after 2 steps: the positions it handed out
    (8 bytes each) and DALI's reader state, the same size on 1.28M samples as on a tenth of it."""
    _, big = _state_after(imagenet_sized, 2)
    _, small = _state_after(tenth_sized, 2)
    big_bytes, small_bytes = len(pickle.dumps(big)), len(pickle.dumps(small))
    handed = 2 * ARGS["batch_size"]
    assert len(big["positions"]) == 8 * handed
    assert abs(big_bytes - small_bytes) < 1024, (big_bytes, small_bytes)
    assert big_bytes < 8 * handed + 64 * 1024, big_bytes


def test_resharding_64_to_48_covers_the_epoch_once(imagenet_sized):
    """A state saved at 64 ranks after 2 steps, restored at 48: the positions trained before
    and the 48 runs left make the 1,281,167 samples of the epoch, each exactly once; every new
    rank yields the same number of steps; rank 47 of 48 reads a full batch of its run (real
    DALI, through the index of its run). The 64 states hand out 2 x 256 positions of each
    rank's part, as a loader's state lists them: at the metadata level, because this set's
    keys repeat inside each tar, so a real loader's positions here are not one per sample."""
    steps, batch = 2, ARGS["batch_size"]
    loader = make_loader(str(imagenet_sized), "train", rank=0, world_size=WORLD, return_keys=True, **ARGS)
    spec, epoch = loader.spec, loader.spec.epoch
    rng = np.random.default_rng(0)
    states = []
    for rank in range(WORLD):
        lo, hi = replace(spec, rank=rank).part
        states.append({"epoch": epoch, "batch": steps,
                       "positions": positions_bytes(rng.choice(np.arange(lo, hi), steps * batch, replace=False))})
    rest = remainder_of(states, epoch, TRAIN)
    assert rest.left(TRAIN) == TRAIN - WORLD * steps * batch
    runs = [replace(spec, rank=r, world_size=48, remainder=rest) for r in range(48)]
    seen = np.concatenate([np.flatnonzero(rest.done_mask(TRAIN))] + [r.positions(epoch) for r in runs])
    assert len(seen) == TRAIN and np.array_equal(np.sort(seen), np.arange(TRAIN))
    assert len({r.num_batches for r in runs}) == 1
    assert runs[0].num_batches == steps + ((TRAIN - WORLD * steps * batch) // 48) // batch

    last = make_loader(str(imagenet_sized), "train", rank=47, world_size=48, return_keys=True, **ARGS)
    last.reshard(rest)
    assert len(last) == runs[47].num_batches
    images, labels, keys = next(iter(last))
    assert images.shape[0] == labels.shape[0] == len(keys) == batch


def test_anonymous_memory_is_flat_over_many_batches(demo_shards):
    """mem_anon (RssAnon + RssShmem, pipeline.usage) over 200 batches of 16 on the demo set
    (13 passes, each a new DALI pipeline), after 2 passes of warm-up: it grows by less than
    24 MB. File-backed memory (the tars DALI maps) is left out on purpose."""
    loader = make_loader(str(demo_shards), "train", batch_size=16, device="cpu", crop_size=32, num_threads=1)

    def batches(n):
        done = 0
        while done < n:
            for _ in loader:
                done += 1
                if done == n:
                    return

    batches(2 * len(loader))
    before = resident_split_mib()[0]
    batches(200)
    growth = resident_split_mib()[0] - before
    assert growth < 24, f"anonymous memory grew {growth:.1f} MB over 200 batches"


AUDIT_HELPER = Path(__file__).parent / "helpers" / "audit_memory.py"


def test_audit_memory_is_one_epoch_whatever_the_ledger_holds(tmp_path):
    """`python -m orchestration.audit` on a 1,281,167-key manifest and a ledger of 1 vs 4
    epochs of it (metadata only): peak memory (Python heap + Arrow's pool) differs by less
    than 16 MB. One epoch's rows cost ~230 bytes each (Arrow's key counts, the group-by and the
    manifest's keys; measured here): bounded by one epoch, not by the run."""
    def run(epochs):
        out = subprocess.run([sys.executable, str(AUDIT_HELPER), str(tmp_path / f"e{epochs}"), str(TRAIN),
                              str(epochs)], check=True, capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    one, four = run(1), run(4)
    assert (one["epochs"], four["epochs"]) == (1, 4) and four["rows"] == 4 * one["rows"] > 0.99 * 4 * TRAIN
    peak1, peak4 = one["py_peak"] + one["arrow_peak"], four["py_peak"] + four["arrow_peak"]
    assert abs(peak4 - peak1) < 16 * 2**20, (one, four)
    assert peak4 / TRAIN < 300, (peak4 / TRAIN, four)


VERIFY_HELPER = Path(__file__).parent / "helpers" / "verify_memory.py"


def test_verify_memory_is_flat_in_the_manifest(tmp_path):
    """`python -m shards verify` (2 workers) on a set that verifies clean, 40,000 vs 160,000
    manifest rows in tars of 5,000 (`helpers.verify_memory`: hard-linked tars of 8x8 JPEGs, a
    shard's rows in their own row group, as the packer writes them): the verifying process's
    peak (Python heap + Arrow's pool) grows by less than 16 B per added row, its VmHWM by less
    than 64 B. It streams one batch of manifest rows and at most 2 x workers shards' rows at a
    time (measured here: ~1 B per row from 320k to 1.28M rows; before streaming, 782 B)."""
    def run(n):
        out = subprocess.run([sys.executable, str(VERIFY_HELPER), str(tmp_path / str(n)), str(n), "5000", "2"],
                             check=True, capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, big = run(40_000), run(160_000)
    for got, n in ((small, 40_000), (big, 160_000)):
        assert (got["rows"], got["samples"], got["tars"], got["problems"]) == (n, n, n // 5000, 0), got
    added = big["rows"] - small["rows"]
    heap = (big["py_peak"] + big["arrow_peak"]) - (small["py_peak"] + small["arrow_peak"])
    assert heap / added < 16, (heap / added, small, big)
    assert (big["hwm"] - small["hwm"]) / added < 64, ((big["hwm"] - small["hwm"]) / added, small, big)
