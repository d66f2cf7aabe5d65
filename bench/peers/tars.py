"""The shard set's samples as the peers read them: (key, JPEG bytes, label) per tar, in tar
order, with the standard library's `tarfile` (the PIL reference, LitData's packing input).
SPDL reads the same tars with its own parser (`spdl_loader`)."""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.shardset import IMAGE_EXTS, LABEL_EXT


def split_members(name: str) -> tuple[str, str]:
    """("dir/key", "jpg") from a member name "dir/key.jpg" (the key is everything before the
    first dot of the last path part, as WebDataset splits it)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def group_samples(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, label) from consecutive (member name, bytes) of one tar."""
    key, parts = None, {}
    for name, data in members:
        k, ext = split_members(name)
        if k != key and key is not None:
            yield _sample(key, parts)
            parts = {}
        key = k
        parts[ext] = data
    if key is not None:
        yield _sample(key, parts)


def _sample(key: str, parts: dict) -> tuple[str, bytes, int]:
    image = next((bytes(parts[e]) for e in IMAGE_EXTS if e in parts), None)
    if image is None or LABEL_EXT not in parts:
        raise ValueError(f"sample {key!r}: needs an image ({'/'.join(IMAGE_EXTS)}) and a .{LABEL_EXT} member")
    return key, image, int(bytes(parts[LABEL_EXT]).decode())


def read_tar(path: str | Path) -> Iterator[tuple[str, bytes, int]]:
    """The samples of one tar, in order."""
    with tarfile.open(path) as tar:
        yield from group_samples((m.name, tar.extractfile(m).read()) for m in tar if m.isfile())


def split_tars(shards_dir: str | Path, split: str) -> list[Path]:
    """The tars of a split, resolved (a bench view holds symlinks), in the set's order."""
    from shards.layouts import split_tars as layout_tars

    return [Path(t).resolve() for t in layout_tars(Path(shards_dir), split)]


def read_samples(shards_dir: str | Path, split: str, keys: set[str] | None = None) -> dict[str, tuple[bytes, int]]:
    """{key: (JPEG bytes, label)} of a split (only `keys` where given)."""
    out = {}
    for tar in split_tars(shards_dir, split):
        for key, data, label in read_tar(tar):
            if keys is None or key in keys:
                out[key] = (data, label)
    return out
