"""Views of a shard set: folders of symlinks that the loaders read as a set of their own (the
very same files, with their indexes beside them), used by the loader bench and the peers."""
from __future__ import annotations

from pathlib import Path


def shard_view(shards_dir: Path, out: Path, splits: dict[str, str], min_samples: int | None = None) -> Path:
    """A shard set under `out` made of symlinks into `shards_dir`: for each `{split: from_split}`,
    the tars of `from_split` (the first ones holding at least `min_samples`, or all), and the
    set files (classes, stats; the manifest and shards.parquet too where no split is renamed,
    as they are keyed by split). The loaders resolve the links, so they read the very same
    files, with their indexes beside them."""
    from pipeline.shardset import open_split
    from shards.layouts import MANIFEST_FILE, SHARDS_FILE, split_tars

    renamed = any(split != source for split, source in splits.items())
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(shards_dir).iterdir():
        if item.is_file() and not (renamed and item.name in (MANIFEST_FILE, SHARDS_FILE)):
            (out / item.name).symlink_to(item.resolve())
    for split, source in splits.items():
        counts = open_split(shards_dir, source).counts
        (out / split).mkdir()
        total = 0
        for tar, n in zip(split_tars(Path(shards_dir), source), counts):
            (out / split / tar.name).symlink_to(tar.resolve())
            total += n
            if min_samples is not None and total >= min_samples:
                break
    return out
