"""Corrupt samples at read time (`on_corrupt`): which sample broke a DALI pipeline, found
with the same decoder, so the error can name the shard file and the key.

A decode error surfaces from a DALI pipeline run without the sample's name, and leaves the
pipeline unusable. The reader reads a rank's part in order, so the culprit is among the
part's samples read so far and not yet handed out. `find_corrupt` decodes those candidates
with DALI's CPU decoder in batches through an external source, bisecting a failing batch
down to its bad samples: a few small pipeline runs, seconds even at ImageNet scale.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.shardset import IMAGE_EXTS
from shards.index import read_index

log = logging.getLogger(__name__)

_BATCH = 64


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's image lies: its tar, the byte range, and its key."""

    tar: str
    offset: int
    size: int
    key: str

    def where(self) -> str:
        return f"{self.tar} key {self.key}"


class CorruptSample(ValueError):
    """A sample whose image does not decode (on_corrupt='error')."""


def index_samples(idx: Path, tar: str, first: int = 0, end: int | None = None) -> list[SampleRef]:
    """The samples [first, end) of one index, with their image member's byte range."""
    out = []
    for entry in read_index(idx, first, end):
        image = entry.member(IMAGE_EXTS)
        out.append(SampleRef(tar, image.offset, image.size, entry.key))
    return out


def read_image(ref: SampleRef) -> bytes:
    """The image bytes of `ref` (local tar, or a URI read by range through pyarrow.fs)."""
    if "://" in ref.tar:
        from shards.location import resolve

        loc = resolve(ref.tar)
        with loc.fs.open_input_file(loc.path) as f:
            return f.read_at(ref.size, ref.offset)
    with open(ref.tar, "rb") as f:
        f.seek(ref.offset)
        return f.read(ref.size)


def find_corrupt(candidates: Sequence[SampleRef]) -> list[SampleRef]:
    """The candidates whose image does not decode: PIL first (fast, in-process), then DALI's
    own CPU decoder on the rest, in a child process (DALI 2.4 can crash a process that ran a
    pipeline into an undecodable image), bisecting a failing batch down to its bad samples."""
    return [candidates[i] for i in sorted(undecodable([read_image(r) for r in candidates]))]


def undecodable(blobs: Sequence[bytes]) -> set[int]:
    """The positions of the encoded images among `blobs` that PIL or DALI's CPU decoder
    cannot decode (the same check as `find_corrupt`, on bytes from anywhere)."""
    bad = {i for i, b in enumerate(blobs) if not _pil_decodes(b)}
    return bad | _dali_refuses(list(blobs), [i for i in range(len(blobs)) if i not in bad])


def _pil_decodes(blob: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
        return True
    except Exception:  # any failure to decode is the finding
        return False


def _dali_refuses(blobs: list[bytes], ids: list[int]) -> set[int]:
    if not ids or _dali_decodes([blobs[i] for i in ids]):
        return set()
    if len(ids) == 1:
        return {ids[0]}
    mid = len(ids) // 2
    return _dali_refuses(blobs, ids[:mid]) | _dali_refuses(blobs, ids[mid:])


def _dali_decodes(blobs: list[bytes]) -> bool:
    """Whether DALI's CPU decoder decodes all of `blobs` (checked in a child process)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="alexnet-decode-", suffix=".bin") as f:
        for b in blobs:
            f.write(len(b).to_bytes(8, "little"))
            f.write(b)
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "pipeline.corrupt", f.name], capture_output=True, timeout=600)
    return proc.returncode == 0


def _decode_file(path: str) -> int:
    """The child's side of `_dali_decodes`: 0 when every image decodes, 3 otherwise. Leaves by
    os._exit, so a failed pipeline is never torn down (where DALI 2.4 may crash)."""
    import os

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    data = open(path, "rb").read()
    blobs, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 8], "little")
        blobs.append(np.frombuffer(data[pos + 8:pos + 8 + n], dtype=np.uint8))
        pos += 8 + n
    for start in range(0, len(blobs), _BATCH):
        batch = blobs[start:start + _BATCH]

        @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None, prefetch_queue_depth=1)
        def decode():
            # built and run within this iteration, so the closure reads this very batch
            return fn.decoders.image(fn.external_source(source=lambda: batch, batch=True),  # noqa: B023
                                     output_type=types.RGB)

        try:
            pipe = decode()
            pipe.build()
            pipe.run()
        except RuntimeError:
            os._exit(3)
    os._exit(0)


if __name__ == "__main__":
    import sys

    _decode_file(sys.argv[1])
