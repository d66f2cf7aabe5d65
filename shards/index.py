"""DALI WebDataset index (`.idx`) files, byte-identical to DALI's `wds2idx` tool.

Format (DALI `wds2idx.py`, index version v1.2): a header line `v1.2 <samples>`, then one
line per sample: for each of its tar members, `<ext> <data offset> <size> <member name>`,
joined by single spaces. A sample is a run of consecutive regular-file members with the
same basename, where basename/ext split at the first dot after the last '/'. Members whose
basename is empty or ends with '/' (hidden files) are skipped.

`wds2idx` takes offsets from GNU tar's `--block-num` (header block + 1). That equals
`TarInfo.offset_data` for ustar and PAX members; for GNU-format long names (`././@LongLink`)
`wds2idx` points at the long-name block, which is wrong, and we write the true data offset.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

INDEX_VERSION = "v1.2"


def split_member_name(name: str) -> tuple[str, str]:
    """(basename, ext) exactly as `wds2idx.IndexCreator.split_name` splits them."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


class IndexBuilder:
    """Accumulates tar members one by one (the packer feeds it while writing the tar)."""

    def __init__(self) -> None:
        self._samples: list[list[str]] = []
        self._last: str | None = None

    def add(self, name: str, offset_data: int, size: int) -> None:
        """Record one regular-file member whose data starts at byte `offset_data`."""
        base, ext = split_member_name(name)
        if not base or base.endswith("/"):
            return
        component = f"{ext} {offset_data} {size} {name}"
        if base == self._last:
            self._samples[-1].append(component)
        else:
            self._samples.append([component])
            self._last = base

    def __len__(self) -> int:
        return len(self._samples)

    def to_bytes(self) -> bytes:
        if not self._samples:
            raise ValueError("no samples: an empty WebDataset tar has no DALI index")
        lines = [f"{INDEX_VERSION} {len(self._samples)}"]
        lines += [" ".join(parts) for parts in self._samples]
        return ("\n".join(lines) + "\n").encode()


def index_bytes(tar_path: str | os.PathLike) -> bytes:
    """The DALI index of any tar (ours or another WebDataset writer's)."""
    builder = IndexBuilder()
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if member.isreg():
                    builder.add(member.name, member.offset_data, member.size)
    except tarfile.ReadError as e:
        raise ValueError(f"{tar_path}: not a readable tar file ({e}); re-pack or replace it") from e
    if not len(builder):
        raise ValueError(f"{tar_path}: holds no samples; remove it or re-pack the split")
    return builder.to_bytes()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the file from other users
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> Path:
    """Build the index of `tar_path` and write it atomically to `idx_path`."""
    atomic_write_bytes(idx_path, index_bytes(tar_path))
    return Path(idx_path)
