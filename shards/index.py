"""DALI WebDataset index (`.idx`) files, byte-identical to DALI's `wds2idx` tool.

Format (DALI `wds2idx.py`, index version v1.2): a header line `v1.2 <samples>`, then one
line per sample: for each of its tar members, `<ext> <data offset> <size> <member name>`,
joined by single spaces. A sample is a run of consecutive regular-file members with the
same basename, where basename/ext split at the first dot after the last '/'. Members whose
basename is empty or ends with '/' (hidden files) are skipped.

`wds2idx` takes offsets from GNU tar's `--block-num` (header block + 1). That equals
`TarInfo.offset_data` for ustar and PAX members; for GNU-format long names (`././@LongLink`)
`wds2idx` points at the long-name block, which is wrong, and we write the true data offset.

The one reader of the format is here too (`read_index`, `parse_index`): every other module
takes its `IndexEntry`s rather than splitting index lines itself.
"""
from __future__ import annotations

import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

INDEX_VERSION = "v1.2"
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's own split of a member name


def split_member_name(name: str) -> tuple[str, str]:
    """(basename, ext) exactly as `wds2idx.IndexCreator.split_name` splits them."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def member_key(member_name: str) -> str:
    """The WebDataset sample key of a tar member (`a/b.jpg` -> `a/b`), as webdataset splits it."""
    m = _KEY_RE.match(member_name)
    return m.group(1) if m else member_name


class Member(NamedTuple):
    ext: str
    offset: int  # of the member's data in the tar
    size: int
    name: str


class IndexEntry(NamedTuple):
    """One sample of an index: its line, split into fields only when asked (an ImageNet
    split's indexes hold a million lines, read at every loader's start)."""

    line: str

    @property
    def key(self) -> str:
        fields = self.line.split(" ", 4)
        return member_key(fields[3]) if len(fields) > 3 else ""

    @property
    def exts(self) -> list[str]:
        return self.line.split(" ")[0::4]

    @property
    def members(self) -> list[Member]:
        f = self.line.split(" ")
        return [Member(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f) - 3, 4)]

    def member(self, exts: tuple[str, ...]) -> Member | None:
        """The member with the first of `exts` this sample has (None: none of them)."""
        by_ext = {m.ext: m for m in self.members}
        return next((by_ext[e] for e in exts if e in by_ext), None)

    @property
    def end(self) -> int:
        """The byte just past this sample's last member data."""
        return max(m.offset + m.size for m in self.members)


LINES_PARSED = [0]  # sample lines parsed by this process (the scale tests bound it per rank)


def _count(head_line: str, where: str) -> int:
    head = head_line.split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        # v1.2 is the only version that carries member names, which the sample keys need
        raise ValueError(f"{where}: not a DALI {INDEX_VERSION} webdataset index; delete it to have it rebuilt")
    count = int(head[1])
    if count == 0:
        raise ValueError(f"{where}: the index lists no samples; delete it to have it rebuilt")
    return count


def read_count(path: str | os.PathLike) -> int:
    """The sample count an index's header states, reading its first line only (what the split
    arithmetic needs of the tars a rank does not read; `read_index` checks the rest)."""
    with open(path, encoding="utf-8") as f:
        return _count(f.readline(), str(path))


def parse_index(text: str, where: str, first: int = 0, end: int | None = None) -> list[IndexEntry]:
    """Samples [first, end) of the index `text` (from `where`, named in errors), after checking
    its header: the version, and a count that matches its lines."""
    lines = text.splitlines()
    count = _count(lines[0] if lines else "", where)
    if count != len(lines) - 1:
        raise ValueError(f"{where}: header says {count} samples but it lists {len(lines) - 1}; "
                         "delete it to have it rebuilt")
    out = [IndexEntry(line) for line in lines[1 + first: None if end is None else 1 + end]]
    LINES_PARSED[0] += len(out)
    return out


def read_index(path: str | os.PathLike, first: int = 0, end: int | None = None) -> list[IndexEntry]:
    """Samples [first, end) of the `.idx` file at `path`; see `parse_index`."""
    return parse_index(Path(path).read_text(), str(path), first, end)


def write_entries(path: str | os.PathLike, entries: list[IndexEntry]) -> Path:
    """An index file listing exactly `entries` (DALI's reader then reads only those samples)."""
    if not entries:
        raise ValueError(f"{path}: an index needs at least one sample")
    Path(path).write_text(f"{INDEX_VERSION} {len(entries)}\n" + "\n".join(e.line for e in entries) + "\n")
    return Path(path)


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
