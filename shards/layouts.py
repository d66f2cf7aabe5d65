"""Shard-set layout: split names, shard file names and the fixed file names of a shard set.

The pipeline imports these constants, so they are the one place the on-disk names live
(DESIGN.md "Shard output").
"""
from __future__ import annotations

import re
from pathlib import Path

SPLITS: tuple[str, ...] = ("train", "val")

CLASSES_FILE = "classes.json"
MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"
STATS_FILE = "stats.json"
SHARDS_FILE = "shards.parquet"  # one row per shard: split, shard, bytes, samples, sha256
# The packer's own bookkeeping (settings fingerprint, one record per completed shard).
PACK_DIR = ".pack"

SHARD_PREFIX = "shard-"
TAR_SUFFIX = ".tar"
IDX_SUFFIX = ".idx"
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"



def shard_name(i: int) -> str:
    """File name of shard number `i`: `shard-000000.tar`."""
    if i < 0:
        raise ValueError(f"shard number must be >= 0, got {i}")
    return f"{SHARD_PREFIX}{i:06d}{TAR_SUFFIX}"


def index_name(tar_name: str) -> str:
    """The DALI index beside a tar: `shard-000000.tar` -> `shard-000000.idx`."""
    if not tar_name.endswith(TAR_SUFFIX):
        raise ValueError(f"not a .tar name: {tar_name}")
    return tar_name[: -len(TAR_SUFFIX)] + IDX_SUFFIX


def split_tars(shards_dir: Path, split: str) -> list[Path]:
    """The split's tar files in order (any `*.tar`, so shards from other writers count too)."""
    return sorted((Path(shards_dir) / split).glob("*" + TAR_SUFFIX))


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(stem: str) -> str:
    """WebDataset key for a source file stem: ASCII letters, digits, `_` and `-` only, every
    other character `_`. DALI splits member names at the first dot and its index at spaces,
    and a file name that is not valid UTF-8 must not reach the tar; the manifest's `source`
    keeps the file's own name (`display_path`)."""
    return _KEY_UNSAFE.sub("_", stem)


def display_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes of a non-UTF-8 file name (which Python holds as
    surrogate escapes) are written `\\xNN`; every other name is unchanged."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

# The way out when a set file (manifest.parquet, shards.parquet) does not parse.
REPACK = "re-pack the set (python -m shards build --source ... --out ... --overwrite)"
