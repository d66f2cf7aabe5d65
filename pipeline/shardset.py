"""One split of a shard set, checked up front: its tars, their DALI indexes, sample counts.

Both backends read a split through `open_split`, so they see the same tars in the same
order and split them across ranks the same way. Shards written by other WebDataset tools
may come without `.idx` files: the index is then built once into a cache directory keyed
by the tar's absolute path, size and mtime (never into the user's shard directory).
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.index import write_index
from shards.layouts import IDX_SUFFIX, IMAGE_EXT, LABEL_EXT, MANIFEST_FILE, SPLITS, split_tars

# Image member extensions read (ours is `jpg`; other WebDataset writers also use these).
IMAGE_EXTS = (IMAGE_EXT, "jpeg", "png")
DEFAULT_INDEX_CACHE = Path.home() / ".cache" / "alexnet-dali" / "idx"

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class ShardSplit:
    """The tars of one split, in order, with their index files and sample counts."""

    root: Path
    split: str
    tars: tuple[Path, ...]
    indexes: tuple[Path, ...]
    counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def member_key(member_name: str) -> str:
    """The WebDataset sample key of a tar member (`a/b.jpg` -> `a/b`), as webdataset splits it."""
    m = _KEY_RE.match(member_name)
    return m.group(1) if m else member_name


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the samples rank `rank` reads, exactly as DALI's readers split them
    (`shard_id * N // num_shards`): parts differ in size by at most one sample."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def open_split(
    shards_dir: str | os.PathLike, split: str, index_cache_dir: str | os.PathLike | None = None
) -> ShardSplit:
    """Find and check the tars of `shards_dir/split`; build missing indexes into the cache.

    Raises FileNotFoundError / ValueError with one line naming the path and what to do.
    """
    root = Path(shards_dir).expanduser().resolve()
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise FileNotFoundError(
            f"shards directory {root} does not exist: run `make shards` or pass the directory "
            "that holds train/ and val/"
        )
    tars = [t.resolve() for t in split_tars(root, split)]
    if not tars:
        raise FileNotFoundError(
            f"{root / split}: no .tar shards for split {split!r}: run `make shards` "
            f"(or `python -m shards build --splits {split}`)"
        )
    cache = Path(index_cache_dir) if index_cache_dir is not None else DEFAULT_INDEX_CACHE
    indexes, counts = [], []
    for tar in tars:
        idx = tar.with_suffix(IDX_SUFFIX)
        if not idx.is_file():
            idx = _cached_index(tar, cache)
        counts.append(_check_index(tar, idx))
        indexes.append(idx)
    return ShardSplit(root, split, tuple(tars), tuple(indexes), tuple(counts))


def stored_side(shards_dir: str | os.PathLike, split: str) -> int | None:
    """The median shorter side of the split's stored images, from manifest.parquet (None for
    shard sets without a manifest, e.g. written by other tools).

    The median, not the minimum: a real ImageNet holds a few images smaller than 224 that the
    packer never upscales, and every graph resizes those; what the check must catch is a
    whole set packed smaller than the crop."""
    path = Path(shards_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["split", "width", "height"])
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        return None
    sides = pc.min_element_wise(table["width"], table["height"])
    return int(pc.quantile(sides, q=0.5, interpolation="lower")[0].as_py())


def _cached_index(tar: Path, cache: Path) -> Path:
    st = tar.stat()
    digest = hashlib.sha256(f"{tar}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    idx = cache / f"{tar.stem}-{digest}{IDX_SUFFIX}"
    if not idx.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        write_index(tar, idx)  # atomic: concurrent workers may build the same one
    return idx


def _check_index(tar: Path, idx: Path) -> int:
    """Sample count of `tar` from its index, after cheap consistency checks (a header that
    parses, a line per sample, no member past the end of the tar)."""
    try:
        with tarfile.open(tar, "r:") as t:
            t.next()
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{tar}: corrupt shard, not a readable tar ({e}); re-pack or remove it") from e
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        # v1.2 is the only version that carries member names, which the sample keys need
        raise ValueError(f"{idx}: not a DALI v1.2 webdataset index; delete it to have it rebuilt")
    count = int(head[1])
    if count != len(lines) - 1 or count == 0:
        raise ValueError(
            f"{idx}: header says {count} samples but it lists {len(lines) - 1}; delete it to have it rebuilt"
        )
    for line in lines[1:]:
        exts = line.split(" ")[0::4]
        if LABEL_EXT not in exts or not any(e in exts for e in IMAGE_EXTS):
            raise ValueError(
                f"{tar}: sample {line.split(' ')[3]!r} lacks an image ({'/'.join(IMAGE_EXTS)}) or a "
                f".{LABEL_EXT} label member; every sample needs both: re-pack or remove the shard"
            )
    size = tar.stat().st_size
    last = lines[-1].split()
    end = max(int(last[i + 1]) + int(last[i + 2]) for i in range(0, len(last) - 3, 4))
    if end > size:
        raise ValueError(
            f"{tar}: corrupt or truncated shard (its index {idx.name} reaches byte {end}, the tar has "
            f"{size}); re-pack it"
        )
    return count
