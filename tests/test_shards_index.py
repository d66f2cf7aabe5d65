"""The DALI index we write equals what DALI's own `wds2idx` tool writes for the same tar."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from shards.index import IndexBuilder, index_bytes, split_member_name, write_index

WDS2IDX = Path(sys.executable).parent / "wds2idx"


def wds2idx(tar: Path, tmp_path: Path) -> bytes:
    if not WDS2IDX.exists() or shutil.which("tar") is None:
        pytest.skip("DALI's wds2idx or GNU tar is not installed")
    out = tmp_path / (tar.stem + ".wds2idx")
    subprocess.run([str(WDS2IDX), str(tar), str(out)], check=True, capture_output=True)
    return out.read_bytes()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_equals_wds2idx_on_awkward_tar(tmp_path: Path, fmt: int) -> None:
    tar_path = tmp_path / "awkward.tar"
    with tarfile.open(tar_path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("subdir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        add(tar, "subdir/a.jpg", b"x" * 1000)
        add(tar, "subdir/a.cls", b"3")
        add(tar, "b.jpg", b"y" * 513)
        add(tar, "b.cls", b"12")
        add(tar, "b.json", b"{}")
        add(tar, "c.seg.png", b"z" * 7)  # extension after the FIRST dot: "seg.png"
        add(tar, "subdir/.hidden", b"h")  # skipped by wds2idx
        add(tar, "noext", b"n")
        if fmt == tarfile.PAX_FORMAT:  # a name over 100 chars forces a PAX header
            add(tar, "k" * 150 + ".jpg", b"long" * 300)
            add(tar, "k" * 150 + ".cls", b"1")
        add(tar, "b.txt", b"again")  # same basename, not consecutive: a new sample
    ours = index_bytes(tar_path)
    assert ours == wds2idx(tar_path, tmp_path)
    assert ours.startswith(b"v1.2 ")


def test_offsets_point_at_member_data(tmp_path: Path) -> None:
    tar_path = tmp_path / "long.tar"
    payload = bytes(range(256)) * 9
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "p" * 200 + ".jpg", payload)
    line = index_bytes(tar_path).decode().splitlines()[1].split()
    ext, offset, size = line[0], int(line[1]), int(line[2])
    assert ext == "jpg" and size == len(payload)
    with open(tar_path, "rb") as f:
        f.seek(offset)
        assert f.read(size) == payload


def test_equals_wds2idx_on_webdataset_shardwriter(tmp_path: Path) -> None:
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=7, verbose=0) as sink:
        for i in range(20):
            sink.write({"__key__": f"sample_{i:04d}", "jpg": b"\xff\xd8" + bytes(i * 37), "cls": str(i % 3).encode()})
    tars = sorted(tmp_path.glob("wds-*.tar"))
    assert len(tars) == 3
    for tar in tars:
        assert index_bytes(tar) == wds2idx(tar, tmp_path)


def test_write_index_is_atomic_and_complete(tmp_path: Path) -> None:
    tar_path = tmp_path / "one.tar"
    with tarfile.open(tar_path, "w") as tar:
        add(tar, "a.jpg", b"1")
    idx = write_index(tar_path, tmp_path / "one.idx")
    assert idx.read_bytes() == b"v1.2 1\njpg 512 1 a.jpg\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_incremental_builder_matches_reading_back(tmp_path: Path) -> None:
    tar_path = tmp_path / "inc.tar"
    builder = IndexBuilder()
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("x.jpg", b"a" * 600), ("x.cls", b"0"), ("y" * 120 + ".jpg", b"b")]:
            add(tar, name, data)
            # in write mode TarInfo.offset_data is not set: data ends at tar.offset, padded
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            builder.add(name, tar.offset - padded, len(data))
    assert builder.to_bytes() == index_bytes(tar_path)


def test_split_member_name_matches_wds2idx_rule() -> None:
    assert split_member_name("dir.v2/n01_1.jpg") == ("dir.v2/n01_1", "jpg")
    assert split_member_name("a.seg.png") == ("a", "seg.png")


def test_empty_or_broken_tar_raises_one_clear_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(ValueError, match="holds no samples"):
        index_bytes(empty)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable tar"):
        index_bytes(junk)


@pytest.mark.parametrize("name", ["k.jpg", "n01440764_10026.jpg", "x" * 96 + ".cls", "y" * 101 + ".jpg",
                                  "caf\u00e9.jpg"])
def test_shard_writer_tars_are_the_bytes_tarfile_writes(tmp_path: Path, name: str) -> None:
    """The writer builds tar headers itself (in the encoder workers): byte for byte what
    tarfile writes in PAX format, for short ASCII names and for names that need a PAX header."""
    from shards.writer import ShardWriter

    samples = [(name.replace(".", "_", 1).rsplit(".", 1)[0] + str(i), bytes([i]) * size, i)
               for i, size in enumerate((0, 1, 511, 512, 513, 45_000))]
    writer = ShardWriter(tmp_path, "shard-000000.tar")
    for key, data, label in samples:
        writer.add(key, data, label)
    writer.publish()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, data, label in samples:
            for member, blob in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(blob), 0, 0o644
                tar.addfile(info, io.BytesIO(blob))
    assert (tmp_path / "shard-000000.tar").read_bytes() == buf.getvalue()
    assert (tmp_path / "shard-000000.idx").read_bytes() == index_bytes(tmp_path / "shard-000000.tar")
