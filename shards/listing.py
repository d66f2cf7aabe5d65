"""The packer's item lists, spilled to disk: one Arrow IPC file per list, read memory-mapped.

A list of 14 million images held as Python objects took about 290 bytes per item (5.5 GB,
issue 23); here each item is one row of a file (its source path as raw bytes, its class as an
int32 code, its WebDataset key) written a batch at a time, and read back through a memory map:
the rows live in the page cache, which the kernel can drop, not in the packer's heap. What the
packer still holds per item is transient and counted in bytes: an 8-byte hash per key while a
split is listed (to find duplicate keys) and the 8-byte permutation while the train plan is
written.

Rows are written in batches of exactly `BATCH` (the last may be shorter), so row `i` lies in
batch `i // BATCH`: random access costs one batch view, no search.
"""
from __future__ import annotations

import os
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BATCH = 4096  # rows per record batch: what a writer holds as Python objects before writing them
TAKE = 65536  # rows gathered at a time while a plan is written in its shuffled order (a few MB)
ITEMS = 1024  # rows turned into Python objects at a time while a list is iterated
SCHEMA = pa.schema([("source", pa.binary()), ("code", pa.int32()), ("key", pa.string())])
NO_LABEL = -1  # code of an item no labels file names
# A key the packer may have generated for a duplicate (`<key>_dup<n>`): such keys are always
# checked against the others, whatever their hash.
_DUP_FORM = re.compile(r"_dup\d+$")


@dataclass(frozen=True, slots=True)
class Item:
    """One input file: where it is, which split, its class and its WebDataset key."""

    source: str  # path relative to the source root (a non-UTF-8 name as surrogate escapes)
    split: str
    wnid: str | None  # None when the labels file does not name it
    key: str


class Listing(Sequence[Item]):
    """The items of one split (or one plan) in a memory-mapped Arrow IPC file. `wnids` maps a
    row's class code to its wnid: the codes below `known` are the labels (the index of the wnid
    among the sorted classes); codes from `known` on name classes no train/ folder has."""

    def __init__(self, path: Path, split: str, wnids: list[str], known: int) -> None:
        self.path, self.split, self.wnids, self.known = Path(path), split, wnids, known
        self._reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches = self._reader.num_record_batches
        self._len = (batches - 1) * BATCH + self._reader.get_batch(batches - 1).num_rows if batches else 0

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Item:  # type: ignore[override]
        if not -self._len <= i < self._len:
            raise IndexError(f"item {i} of {self._len}")
        i %= self._len
        batch = self._reader.get_batch(i // BATCH)
        row = i % BATCH
        return self._item(batch["source"][row].as_py(), batch["code"][row].as_py(), batch["key"][row].as_py())

    def batch(self, b: int) -> pa.RecordBatch:
        """Record batch `b` (rows `b * BATCH` on), a view of the memory map."""
        return self._reader.get_batch(b)

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def _item(self, source: bytes, code: int, key: str) -> Item:
        return Item(os.fsdecode(source), self.split, self.wnids[code] if code >= 0 else None, key)

    def batches(self, start: int = 0) -> Iterator[pa.RecordBatch]:
        """The record batches from the one holding row `start` on (that one sliced at it)."""
        first = start // BATCH
        for b in range(first, self._reader.num_record_batches):
            batch = self._reader.get_batch(b)
            yield batch.slice(start - first * BATCH) if b == first else batch

    def items(self, start: int = 0) -> Iterator[Item]:
        """Items from row `start` on, one batch of Python objects in memory at a time."""
        for batch in self.batches(start):
            for lo in range(0, batch.num_rows, ITEMS):
                rows = batch.slice(lo, ITEMS)
                yield from map(self._item, *(rows[name].to_pylist() for name in SCHEMA.names))

    def table(self) -> pa.Table:
        """The whole list as a table over the memory map (no copy)."""
        return self._reader.read_all()

    def labelled(self) -> bool:
        """Whether every row has a known class (no label rejects)."""
        codes = self.table()["code"]
        return len(codes) == 0 or (pc.min(codes).as_py() >= 0 and pc.max(codes).as_py() < self.known)


class ListingWriter:
    """Appends rows to an IPC file `BATCH` at a time. Keys are kept apart only by an 8-byte
    hash each; `close` gives every duplicate key its `_dup<n>` name in a second pass over the
    file (only when there is a duplicate), exactly as a dictionary of every key would."""

    def __init__(self, path: Path, split: str, wnids: list[str], known: int) -> None:
        self.path, self.split, self.wnids, self.known = Path(path), split, wnids, known
        self._writer = pa.ipc.new_file(str(path), SCHEMA)
        self._cols: tuple[list, list, list] = ([], [], [])
        self._hashes = array("q")
        self._dup_form = False  # a key of the `_dup<n>` form was listed

    def add(self, source: bytes, code: int, key: str) -> None:
        sources, codes, keys = self._cols
        sources.append(source)
        codes.append(code)
        keys.append(key)
        self._hashes.append(hash(key))
        if "_dup" in key and _DUP_FORM.search(key):
            self._dup_form = True
        if len(keys) == BATCH:
            self._flush(self._writer)

    def _flush(self, writer: pa.ipc.RecordBatchFileWriter) -> None:
        if self._cols[0]:
            writer.write_batch(pa.record_batch(list(self._cols), schema=SCHEMA))
            self._cols = ([], [], [])

    def close(self) -> Listing:
        self._flush(self._writer)
        self._writer.close()
        hashes = np.frombuffer(self._hashes, dtype=np.int64)  # sorted in place: no copy
        hashes.sort()
        clashes = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
        del hashes
        self._hashes = array("q")
        listing = Listing(self.path, self.split, self.wnids, self.known)
        if clashes or self._dup_form:
            listing = self._rename_duplicates(listing, clashes)
        return listing

    def _rename_duplicates(self, listing: Listing, clashes: set[int]) -> Listing:
        """Rewrite the file with each duplicate key renamed. `seen` holds only the keys that may
        meet another (a hash shared with another key, or the `_dup<n>` form): a key with a hash of
        its own is listed once and is never generated, so a full dictionary would give it no
        other name."""
        tmp = self.path.with_name(self.path.name + ".keys")
        seen: dict[str, int] = {}
        with pa.ipc.new_file(str(tmp), SCHEMA) as writer:
            for batch in listing.batches():
                keys = batch["key"].to_pylist()
                for j, key in enumerate(keys):
                    if hash(key) in clashes or _DUP_FORM.search(key):
                        keys[j] = unique_key(key, seen)
                writer.write_batch(pa.record_batch([batch["source"], batch["code"], pa.array(keys, pa.string())],
                                                   schema=SCHEMA))
        del listing
        os.replace(tmp, self.path)
        return Listing(self.path, self.split, self.wnids, self.known)


def unique_key(key: str, seen: dict[str, int]) -> str:
    """`key`, or `<key>_dup<n>` for its n-th repeat in a split (the first such name not taken)."""
    n = seen.get(key, 0)
    seen[key] = n + 1
    if not n:
        return key
    name = f"{key}_dup{n}"
    while name in seen:
        n += 1
        name = f"{key}_dup{n}"
    seen[name] = 1
    return name


def write_plan(listing: Listing, positions: np.ndarray | None, path: Path) -> Listing:
    """The rows of `listing` at `positions` (None: all, in order), in that order, as a new
    listing at `path`; `TAKE` rows in memory at a time."""
    with pa.ipc.new_file(str(path), SCHEMA) as writer:
        if positions is None:
            for batch in listing.batches():
                writer.write_batch(batch)
        else:
            for lo in range(0, len(positions), TAKE):
                writer.write_table(_take(listing, positions[lo:lo + TAKE]), max_chunksize=BATCH)
    return Listing(path, listing.split, listing.wnids, listing.known)


def _take(listing: Listing, positions: np.ndarray) -> pa.Table:
    """The rows at `positions`, gathered one source batch at a time: Arrow's take over the
    whole file's table would first join all its batches in memory (the whole list again)."""
    batch_of = positions // BATCH
    order = np.argsort(batch_of, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(batch_of[order])) + 1)
    gathered = pa.Table.from_batches(
        [listing.batch(int(batch_of[g[0]])).take(pa.array(positions[g] % BATCH)) for g in groups],
        schema=SCHEMA).combine_chunks()  # in batch order
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return gathered.take(pa.array(inverse))
