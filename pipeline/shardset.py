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
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.integrity import Hasher, hash_matches, size_ok, stamped
from pipeline.staging import ShardCache
from pipeline.stats import IMAGENET_STATS, Stats, read_stats
from shards.index import IndexEntry, read_count, read_index, write_index
from shards.layouts import (
    IDX_SUFFIX,
    IMAGE_EXT,
    LABEL_EXT,
    MANIFEST_FILE,
    REPACK,
    SHARDS_FILE,
    SPLITS,
    TAR_SUFFIX,
)
from shards.location import check_reachable, corrupt_file, is_remote, resolve

# Image member extensions read (ours is `jpg`; other WebDataset writers also use these).
IMAGE_EXTS = (IMAGE_EXT, "jpeg", "png")
DEFAULT_INDEX_CACHE = Path.home() / ".cache" / "alexnet-dali" / "idx"
SIDE_SAMPLE = 200_000  # manifest rows the stored-side check reads (its median barely moves past a few thousand)


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
    recorded: dict[str, tuple[int, str]] = field(default_factory=dict, compare=False, repr=False)  # tar name ->
    #                                        (bytes, sha256) from shards.parquet (empty: a set from other writers)
    recorded_at: int = 0  # shards.parquet's mtime (ns): a tar written after it has changed since
    _checked: set[int] = field(default_factory=set, compare=False, repr=False)  # tars `check` passed

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
        pack time, judged without hashing them on this path where possible: a size that
        differs (one stat) or a sha256 the background `Hasher` found wrong. A tar written
        after `shards.parquet` (changed since it was recorded) is hashed here, once per node
        (a good hash is stamped). Every other tar is queued for the background hash while
        the pass reads it: rot that left size and mtime alone is named when it is read.
        Sets without `shards.parquet` (other writers) and streamed tars are taken as they are."""
        if not self.recorded or isinstance(self.tars[0], str):
            return []
        hasher, bad = Hasher.shared(), []
        failed = hasher.failed()
        for i in tar_ids:
            tar = Path(self.tars[i])
            size, sha = self.recorded.get(tar.name, (None, None))
            if size is None or not tar.is_file():  # not recorded; a staged tar is checked when fetched
                continue
            if not size_ok(tar, size) or str(tar) in failed:
                bad.append(i)
            elif stamped(tar, sha):
                continue
            elif tar.stat().st_mtime_ns > self.recorded_at:
                if not hash_matches(tar, sha):
                    bad.append(i)
            else:
                hasher.submit(tar, sha)
        return bad

    def hash_failures(self, tar_ids: list[int]) -> list[int]:
        """The tars among `tar_ids` whose background sha256 came out wrong so far."""
        failed = Hasher.shared().failed() if self.recorded else set()
        return [i for i in tar_ids if str(self.tars[i]) in failed]

    def check(self, tar_ids: list[int]) -> None:
        """The full checks of these tars, once each per process (a rank checks the tars of
        its part as a pass needs them, not the whole split): a tar header that parses (local
        tars), an index line per sample with an image and a label, none past the tar's end.
        Raises ValueError in one line naming the file and what to do."""
        for i in tar_ids:
            if i in self._checked:
                continue
            tar = self.tars[i]
            if not isinstance(tar, str) and Path(tar).is_file():
                _check_tar_header(Path(tar))
            where = f"{self.uri}/{self.split}/{Path(str(tar)).name}" if self.remote else str(tar)
            count = _check_index(where, self.indexes[i], self.sizes[i])
            if count != self.counts[i]:
                raise ValueError(f"{where}: its index lists {count} samples, {SHARDS_FILE} {self.counts[i]}; "
                                 f"the set changed since it was packed: {REPACK}")
            self._checked.add(i)

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
    tars, listed = _split_files(root, split)
    if not tars:
        raise FileNotFoundError(
            f"{root / split}: no .tar shards for split {split!r}: run `make shards` "
            f"(or `python -m shards build --splits {split}`)"
        )
    cache = Path(index_cache_dir) if index_cache_dir is not None else DEFAULT_INDEX_CACHE
    rows = _recorded(root, split)
    indexes, counts, sizes = [], [], []
    for tar in tars:
        # The split arithmetic needs each tar's count and size: shards.parquet's, with no file
        # opened or stat'ed (a rank checks its own tars against them as it reads them); else its
        # index's header line and a stat (sets from other writers).
        idx = tar.with_suffix(IDX_SUFFIX)
        row = rows.get(tar.name)
        if row is not None and (idx.name in listed if tar.parent == root / split else idx.is_file()):
            sizes.append(row[0])
            counts.append(row[2])
        else:
            if not idx.is_file():
                idx = _cached_index(tar, cache)
            sizes.append(tar.stat().st_size)
            counts.append(read_count(idx))
        indexes.append(idx)
    return ShardSplit(root, split, tuple(tars), tuple(indexes), tuple(counts), uri=str(root), sizes=tuple(sizes),
                      stats=read_stats(root), stored_side=stored_side(root, split),
                      recorded={n: r[:2] for n, r in rows.items()}, recorded_at=_mtime_ns(root / SHARDS_FILE))


def _split_files(root: Path, split: str) -> tuple[list[Path], set[str]]:
    """The split's tars in order, symbolic links resolved, and the names its folder holds: one
    listing of the folder, no stat of each file (what `split_tars` and `resolve()` cost)."""
    folder = root / split
    if not folder.is_dir():
        return [], set()
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    tars = [Path(e.path).resolve() if e.is_symlink() else folder / e.name
            for e in entries if e.name.endswith(TAR_SUFFIX)]
    return tars, {e.name for e in entries}


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
    rows = _recorded(cache.dir, split)
    tars, indexes, counts, sizes = [], [], [], []
    for name, size in listing:
        rel = f"{split}/{name}"
        idx = cache.local(rel[: -len(TAR_SUFFIX)] + IDX_SUFFIX)
        if not idx.is_file():  # a set from another writer: index the tar once, locally
            local_tar = cache.fetch([rel])[0]
            idx = _cached_index(local_tar, index_cache)
        counts.append(rows[name][2] if name in rows else read_count(idx))
        indexes.append(idx)
        sizes.append(size)
        tars.append(str(loc / rel) if stream else cache.local(rel))
    return ShardSplit(cache.dir, split, tuple(tars), tuple(indexes), tuple(counts), uri=loc.uri, cache=cache,
                      sizes=tuple(sizes), stats=read_stats(cache.dir), stored_side=stored_side(cache.dir, split),
                      recorded={n: r[:2] for n, r in rows.items()}, recorded_at=_mtime_ns(cache.dir / SHARDS_FILE))


def stored_side(shards_dir: str | os.PathLike, split: str) -> int | None:
    """The median shorter side of the split's stored images, from manifest.parquet (None for
    shard sets without a manifest, e.g. written by other tools).

    The median, not the minimum: a real ImageNet holds a few images smaller than 224 that the
    packer never upscales, and every graph resizes those; what the check must catch is a
    whole set packed smaller than the crop. Of the split's first `SIDE_SAMPLE` rows: enough
    for a median, and no rank reads ImageNet-21k's 14M rows at every start."""
    path = Path(shards_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    try:  # at most SIDE_SAMPLE rows of the split: every rank reads this at each start (issue 23)
        table = ds.dataset(path, format="parquet").head(SIDE_SAMPLE, columns=["width", "height"],
                                                         filter=ds.field("split") == split)
    except pa.ArrowException as err:
        raise corrupt_file(str(path), err, REPACK) from None
    if table.num_rows == 0:
        return None
    sides = pc.min_element_wise(table["width"], table["height"])
    return int(pc.quantile(sides, q=0.5, interpolation="lower")[0].as_py())


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def recorded_shards(root: Path, split: str) -> dict[str, tuple[int, str]]:
    """Tar name -> (bytes, sha256) of `split` from shards.parquet (empty without one)."""
    return {name: row[:2] for name, row in _recorded(root, split).items()}


def _recorded(root: Path, split: str) -> dict[str, tuple[int, str, int]]:
    """Tar name -> (bytes, sha256, samples) of `split` from shards.parquet (empty without one)."""
    path = root / SHARDS_FILE
    if not path.is_file():
        return {}
    import pyarrow.compute as pc

    table = resolve(path).read_parquet(["split", "shard", "bytes", "sha256", "samples"], REPACK)
    table = table.filter(pc.equal(table["split"], split))
    return {name: (int(size), sha, int(n)) for name, size, sha, n in
            zip(*(table[c].to_pylist() for c in ("shard", "bytes", "sha256", "samples")), strict=True)}


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


_LINE = re.compile(r"[^ ]+ \d+ \d+ [^ ]+(?: [^ ]+ \d+ \d+ [^ ]+)*")  # `ext offset size name` per member


def _check_index(tar: str, idx: Path, size: int) -> int:
    """Sample count of `tar` (`size` bytes) from its index, after cheap consistency checks (a
    header that parses, a line per sample, no member past the end of the tar)."""
    entries = read_index(idx)
    for n, entry in enumerate(entries, start=2):
        if not _LINE.fullmatch(entry.line):
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
