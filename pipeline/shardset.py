"""Opening one split of a shard set, local or remote, in one place: `open_split` returns a
`ShardSplit` that holds everything a loader reads about the set (tars, indexes, counts,
sizes, stats, the stored image side), checked up front.

Both backends read a split through it, so they see the same tars in the same order and
split them across ranks the same way. A remote set is staged through a node-local
`ShardCache` (`pipeline.staging`), or streamed by DALI (`cache_dir="none"`). Shards written
by other WebDataset tools may come without `.idx` files: the index is then built once into
a cache directory keyed by the tar's absolute path, size and mtime (never into the user's
shard directory).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.staging import ShardCache, file_sha256
from pipeline.stats import IMAGENET_STATS, Stats, read_stats
from shards.index import IndexEntry, read_index, write_index
from shards.layouts import (
    IDX_SUFFIX,
    IMAGE_EXT,
    LABEL_EXT,
    MANIFEST_FILE,
    REPACK,
    SHARDS_FILE,
    SPLITS,
    TAR_SUFFIX,
    split_tars,
)
from shards.location import check_reachable, is_remote, resolve

# Image member extensions read (ours is `jpg`; other WebDataset writers also use these).
IMAGE_EXTS = (IMAGE_EXT, "jpeg", "png")
DEFAULT_INDEX_CACHE = Path.home() / ".cache" / "alexnet-dali" / "idx"
VERIFIED_DIR = Path.home() / ".cache" / "alexnet-dali" / "verified"  # stamps of tars whose sha256 matched


@dataclass(frozen=True)
class ShardSplit:
    """The tars of one split, in order, with their index files and sample counts.

    `root` is a local folder holding the set files (classes, stats, manifest): the set
    itself, or for a remote set its node-local mirror. `tars` are what the readers open:
    local paths (for a staged remote set, where each tar lands once `ensure` fetched it),
    or the store's URIs when streaming (`cache_dir="none"`). `uri` is the set as given."""

    root: Path
    split: str
    tars: tuple[Path | str, ...]
    indexes: tuple[Path, ...]
    counts: tuple[int, ...]
    uri: str = ""
    cache: ShardCache | None = field(default=None, compare=False, repr=False)
    sizes: tuple[int, ...] = ()  # bytes of each tar
    stats: Stats = field(default=IMAGENET_STATS, compare=False)  # stats.json (ImageNet's without one)
    stored_side: int | None = None  # median shorter side of the stored images (None: no manifest)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def entries(self, tar_id: int, first: int = 0, end: int | None = None) -> list[IndexEntry]:
        """Samples [first, end) of tar `tar_id`, from its index."""
        return read_index(self.indexes[tar_id], first, end)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def unverified(self, tar_ids: list[int]) -> list[int]:
        """The tars among `tar_ids` whose bytes differ from what `shards.parquet` recorded at
        pack time (rot on a disk, a bad copy). Each tar is hashed once per node: a stamp keyed
        by its path, size and mtime remembers a good hash. Sets without `shards.parquet`
        (other writers) and staged copies (checked when fetched) are taken as they are."""
        if self.cache is not None:
            return []
        expected = _recorded_hashes(self.root)
        if not expected:
            return []
        bad = []
        for i in tar_ids:
            tar = Path(self.tars[i])
            want = expected.get((self.split, tar.name))
            if want is not None and not _hash_ok(tar, want):
                bad.append(i)
        return bad

    def ensure(self, tar_ids: list[int], then: list[int] | None = None) -> None:
        """Make these tars readable locally (a no-op for local sets and for streaming); then
        stage `then` (the next pass's) in the background."""
        if self.cache is None or isinstance(self.tars[0], str):
            return
        rels = [f"{self.split}/{Path(self.tars[i]).name}" for i in tar_ids]
        self.cache.pin(rels)
        self.cache.fetch(rels)
        if then:
            self.cache.prefetch([f"{self.split}/{Path(self.tars[i]).name}" for i in then])

    def check_space(self, tar_ids: list[int], what: str) -> None:
        """Staged remote sets: one line now if the cache disk cannot hold these tars at once."""
        if self.cache is not None and not isinstance(self.tars[0], str):
            self.cache.check_space([f"{self.split}/{Path(self.tars[i]).name}" for i in tar_ids], what)


def open_split(
    shards_dir: str | os.PathLike, split: str, index_cache_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None, cache_max_gb: float = 0.0,
) -> ShardSplit:
    """Find and check the tars of `shards_dir/split`; build missing indexes into the cache.

    `shards_dir` is a path or a URI (DESIGN.md "Locations"). A remote set is staged through a
    node-local `ShardCache` in `cache_dir` (default ~/.cache/alexnet-dali/shards): the set
    files and indexes now, each tar when a pass needs it; `cache_dir="none"` streams the
    tars through DALI's own reader instead. Raises FileNotFoundError / ValueError /
    StorageError with one line naming the path and what to do.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    if is_remote(shards_dir):
        return _open_remote(str(shards_dir), split, index_cache_dir, cache_dir, cache_max_gb)
    root = Path(shards_dir).expanduser().resolve()
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
    indexes, counts, sizes = [], [], []
    for tar in tars:
        idx = tar.with_suffix(IDX_SUFFIX)
        if not idx.is_file():
            idx = _cached_index(tar, cache)
        _check_tar_header(tar)
        sizes.append(tar.stat().st_size)
        counts.append(_check_index(str(tar), idx, sizes[-1]))
        indexes.append(idx)
    return ShardSplit(root, split, tuple(tars), tuple(indexes), tuple(counts), uri=str(root), sizes=tuple(sizes),
                      stats=read_stats(root), stored_side=stored_side(root, split))


def _open_remote(uri: str, split: str, index_cache_dir, cache_dir, cache_max_gb: float) -> ShardSplit:
    loc = resolve(uri)
    check_reachable(loc)
    stream = str(cache_dir).lower() == "none" if cache_dir is not None else False
    cache = ShardCache(loc, None if stream else cache_dir, max_bytes=int(float(cache_max_gb) * 1e9))
    listing = cache.fetch_meta([split])[split]
    if not listing:
        other = [s for s in SPLITS if (loc / s).list()]
        raise FileNotFoundError(
            f"{loc / split}: no .tar shards for split {split!r} (the prefix holds "
            f"{', '.join(other) or 'no split folders'}); "
            f"pack with `python -m shards build --out {loc}` or pass the prefix that holds train/ and val/"
        )
    index_cache = Path(index_cache_dir) if index_cache_dir is not None else DEFAULT_INDEX_CACHE
    tars, indexes, counts, sizes = [], [], [], []
    for name, size in listing:
        rel = f"{split}/{name}"
        idx = cache.local(rel[: -len(TAR_SUFFIX)] + IDX_SUFFIX)
        if not idx.is_file():  # a set from another writer: index the tar once, locally
            local_tar = cache.fetch([rel])[0]
            idx = _cached_index(local_tar, index_cache)
        counts.append(_check_index(str(loc / rel), idx, size))
        indexes.append(idx)
        sizes.append(size)
        tars.append(str(loc / rel) if stream else cache.local(rel))
    return ShardSplit(cache.dir, split, tuple(tars), tuple(indexes), tuple(counts), uri=loc.uri, cache=cache,
                      sizes=tuple(sizes), stats=read_stats(cache.dir), stored_side=stored_side(cache.dir, split))


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

    table = resolve(path).read_parquet(["split", "width", "height"], REPACK)
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        return None
    sides = pc.min_element_wise(table["width"], table["height"])
    return int(pc.quantile(sides, q=0.5, interpolation="lower")[0].as_py())


def _recorded_hashes(root: Path) -> dict[tuple[str, str], str]:
    path = root / SHARDS_FILE
    if not path.is_file():
        return {}
    rows = resolve(path).read_parquet(["split", "shard", "sha256"], REPACK).to_pylist()
    return {(r["split"], r["shard"]): r["sha256"] for r in rows}


def _hash_ok(tar: Path, want: str) -> bool:
    """Whether `tar` hashes to `want`; a good result is stamped (path, size, mtime) so the
    next pass and the next process on this node skip the read."""
    st = tar.stat()
    stamp = VERIFIED_DIR / hashlib.sha256(f"{tar}\0{st.st_size}\0{st.st_mtime_ns}\0{want}".encode()).hexdigest()[:32]
    if stamp.is_file():
        return True
    if file_sha256(tar) != want:
        return False
    VERIFIED_DIR.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    return True


def _cached_index(tar: Path, cache: Path) -> Path:
    st = tar.stat()
    digest = hashlib.sha256(f"{tar}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    idx = cache / f"{tar.stem}-{digest}{IDX_SUFFIX}"
    if not idx.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        write_index(tar, idx)  # atomic: concurrent workers may build the same one
    return idx


def _check_tar_header(tar: Path) -> None:
    try:
        with tarfile.open(tar, "r:") as t:
            t.next()
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{tar}: corrupt shard, not a readable tar ({e}); re-pack or remove it") from e


def _check_index(tar: str, idx: Path, size: int) -> int:
    """Sample count of `tar` (`size` bytes) from its index, after cheap consistency checks (a
    header that parses, a line per sample, no member past the end of the tar)."""
    entries = read_index(idx)
    for n, entry in enumerate(entries, start=2):
        fields = entry.line.split(" ")
        if len(fields) % 4 or not all(f.isdigit() for f in fields[1::4] + fields[2::4]):
            raise ValueError(f"{idx}: line {n} is not `ext offset size name` per member; "
                             "delete it to have it rebuilt")
        exts = entry.exts
        if LABEL_EXT not in exts or not any(e in exts for e in IMAGE_EXTS):
            raise ValueError(
                f"{tar}: sample {entry.members[0].name!r} lacks an image ({'/'.join(IMAGE_EXTS)}) or a "
                f".{LABEL_EXT} label member; every sample needs both: re-pack or remove the shard"
            )
    end = entries[-1].end
    if end > size:
        raise ValueError(
            f"{tar}: corrupt or truncated shard (its index {idx.name} reaches byte {end}, the tar has "
            f"{size}); re-pack it"
        )
    return len(entries)
