"""The packer's memory per listed item before encoding (issue 23, finding 7): discovery, the
plan and the fingerprint, as `python -m shards build` runs them, over a train tree of N images.

    python tests/helpers/discovery_memory.py ROOT N [--classes C] [--generated]

Builds ROOT/train/<wnid>/ with N zero-byte `.JPEG` files in C class folders (kept for the next
run), or with `--generated` only the empty class folders, each listed as N/C generated entries
(what the packer does with an entry is the same; no million files to create). One warm-up
round on a tiny tree first (imports, caches), then the measured round; prints one JSON line:
`items`, `py_peak` (tracemalloc's peak, bytes), `py_held` (still held at the end), `arrow_peak`
(the peak of Arrow's memory pool since the start: what tracemalloc does not see), `seconds`, the fingerprint and
the first and last keys of the train plan. Run each size in its own process (Arrow's peak cannot
be reset); `PYTHONPATH=<an older checkout>` measures an older packer.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path


def make_tree(root: Path, n: int, classes: int, files: bool) -> None:
    """N/C zero-byte images in each of C class folders (or only the folders)."""
    per = n // classes
    marker = root / f".made-{n}-{classes}-{int(files)}"
    if marker.exists():
        return
    for c in range(classes):
        folder = os.path.join(root, "train", f"n{c:08d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per if files else 0):
            os.close(os.open(f"{folder}/n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()


class _Entry:
    """What `os.scandir` yields for a regular file, for a generated listing."""

    __slots__ = ("name", "path")

    def __init__(self, folder: str, name: str) -> None:
        self.name, self.path = name, f"{folder}/{name}"

    def is_symlink(self) -> bool:
        return False

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        return False

    def is_file(self, follow_symlinks: bool = True) -> bool:
        return True


def generate(per: int) -> None:
    """Class folders list `per` generated images each (train/ itself is listed for real)."""
    import shards.sources as sources

    real = sources._scan

    def scan(folder: Path) -> list:
        folder = Path(folder)
        if folder.parent.name != "train":
            return real(folder)
        names = sorted(f"{folder.name}_{i}.JPEG" for i in range(per))
        return [_Entry(str(folder), name) for name in names]

    sources._scan = scan


def run(root: Path) -> tuple:
    from shards import pack, sources

    tree = sources.discover(root, ("train",))
    plan, _ = pack._plan(tree, "train", 0)
    fingerprint = pack._fingerprint(tree, {"settings": 1})
    first, last = plan[0].key, plan[len(plan) - 1].key
    return tree, plan, fingerprint, first, last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--generated", action="store_true")
    args = parser.parse_args()
    import pyarrow as pa

    warm = args.root / "warm"
    make_tree(warm, 1000, 10, files=not args.generated)
    make_tree(args.root / "tree", args.n, args.classes, files=not args.generated)
    if args.generated:
        generate(args.n // args.classes)
    tree = run(warm)[0]  # imports and caches outside the figures
    if hasattr(tree, "close"):
        tree.close()
    del tree
    gc.collect()
    pool = pa.default_memory_pool()
    tracemalloc.start()
    t0 = time.perf_counter()
    tree, plan, fingerprint, first, last = run(args.root / "tree")
    seconds = time.perf_counter() - t0
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    items = len(plan)
    print(json.dumps({"items": items, "py_peak": peak, "py_held": held,
                      "arrow_peak": pool.max_memory(), "seconds": round(seconds, 2),
                      "fingerprint": fingerprint, "first": first, "last": last,
                      "packer": sys.modules["shards.sources"].__file__}))


if __name__ == "__main__":
    main()
