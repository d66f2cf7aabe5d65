"""Bad input is caught up front with one line naming the file or setting; foreign shards
get their index built into the cache; label bytes parse in one vectorised step."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.shard_writers import write_colour_shards

from pipeline import make_loader
from pipeline.loaders import parse_labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_colour_shards(root, "train", 20, per_shard=10)
    write_colour_shards(root, "val", 10, per_shard=10)
    return root


def make(root, split="val", tmp=None, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("crop_size", 16)
    return make_loader(root, split, batch_size=4, index_cache_dir=tmp, **kw)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        make(tmp_path / "nowhere", tmp=tmp_path)
    assert "nowhere" in one_line(e) and "make shards" in one_line(e)


def test_empty_split(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        make(tmp_path, tmp=tmp_path)
    assert str(tmp_path / "val") in one_line(e)


def test_tar_that_does_not_parse(shards, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shards, root)
    (root / "val" / "part-001.tar").write_bytes(b"this is not a tar file\n" * 100)
    with pytest.raises(ValueError) as e:
        make(root, tmp=tmp_path / "idx")
    assert "part-001.tar" in one_line(e)


def test_truncated_tar_against_its_index(shards, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shards, root)
    make(root, tmp=root / "idx")  # builds the cached index of the whole tar
    tar = root / "val" / "part-000.tar"
    (root / "val" / "part-000.idx").write_bytes(next((root / "idx").glob("part-000-*.idx")).read_bytes())
    tar.write_bytes(tar.read_bytes()[:4096])
    with pytest.raises(ValueError) as e:
        make(root, tmp=root / "idx")
    assert "part-000.tar" in one_line(e) and "truncated" in one_line(e)


@pytest.mark.parametrize("damage,needle", [
    (lambda lines: lines[:1] + ["jpg 512 notanumber a.jpg cls 1024 1 a.cls"] + lines[2:], "line 2"),
    (lambda lines: lines[:2] + ["jpg 512"] + lines[3:], "line 3"),
    (lambda lines: [lines[0].split()[0] + " 0"], "no samples"),
])
def test_a_malformed_index_line_is_named_before_any_read(shards, tmp_path, damage, needle):
    root = tmp_path / "copy"
    shutil.copytree(shards, root)
    make(root, tmp=root / "idx")
    idx = root / "val" / "part-000.idx"
    lines = next((root / "idx").glob("part-000-*.idx")).read_text().splitlines()
    idx.write_text("\n".join(damage(lines)) + "\n")
    with pytest.raises(ValueError) as e:
        make(root, tmp=root / "idx")
    assert str(idx) in one_line(e) and needle in one_line(e) and "rebuilt" in one_line(e)


def test_crop_larger_than_the_stored_images(shards, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shards, root)
    # val shorter sides 12, 40, 44: one small image (real ImageNet has some under 224, never
    # upscaled by the packer) does not refuse the set; a crop above the set's median does.
    manifest = pa.table({"split": ["val", "val", "val", "train"], "width": [60, 48, 12, 20],
                         "height": [40, 44, 30, 20]})
    pq.write_table(manifest, root / "manifest.parquet")
    make(root, crop_size=40, tmp=tmp_path)
    with pytest.raises(ValueError) as e:
        make(root, crop_size=41, tmp=tmp_path)
    assert "crop_size=41" in one_line(e) and "shorter side 40" in one_line(e)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(rank=2, world_size=2), "rank=2"),
        (dict(backend="tf"), "backend='tf'"),
        (dict(crop="centre"), "crop='centre'"),
        (dict(dtype="int8"), "dtype='int8'"),
        (dict(ten_crop=True, split="train"), "ten_crop"),
        (dict(rrc_scale=(0.5, 0.1)), "rrc_scale"),
        (dict(split="test"), "split='test'"),
    ],
)
def test_bad_settings(shards, tmp_path, kwargs, needle):
    with pytest.raises(ValueError) as e:
        make(shards, tmp=tmp_path, **kwargs)
    assert needle in one_line(e)


def test_unknown_extra_argument_lists_the_valid_ones(shards, tmp_path):
    with pytest.raises(TypeError, match="ten_crop"):
        make(shards, tmp=tmp_path, tencrop=True)


def test_train_batch_larger_than_a_rank_part(shards, tmp_path):
    with pytest.raises(ValueError) as e:
        make_loader(shards, "train", batch_size=8, world_size=3, device="cpu", crop_size=16,
                    index_cache_dir=tmp_path)
    assert "batch_size=8" in one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_gpu(shards, tmp_path):
    with pytest.raises(ValueError, match="device='cpu'"):
        make(shards, tmp=tmp_path, device="cuda")


def test_foreign_index_is_cached_and_reused(shards, tmp_path):
    make(shards, tmp=tmp_path / "idx")
    cached = sorted((tmp_path / "idx").glob("*.idx"))
    assert len(cached) == 1 and not list((shards / "val").glob("*.idx"))
    stamp = cached[0].stat().st_mtime_ns
    make(shards, tmp=tmp_path / "idx")
    assert cached[0].stat().st_mtime_ns == stamp


def test_parse_labels():
    rows = [b"7", b"123", b"42\n", b" 9", b"999"]
    width = max(map(len, rows))
    raw = torch.tensor([list(r.ljust(width, b"\0")) for r in rows], dtype=torch.uint8)
    assert parse_labels(raw).tolist() == [7, 123, 42, 9, 999]
    assert parse_labels(raw).dtype == torch.int64
    for bad in (b"x1", b"\0\0"):
        with pytest.raises(ValueError, match="not an ASCII decimal"):
            parse_labels(torch.tensor([list(bad)], dtype=torch.uint8))


def _foreign(root, samples):
    import webdataset as wds

    (root / "val").mkdir(parents=True)
    with wds.ShardWriter(str(root / "val" / "x-%03d.tar"), maxcount=100, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


def _png(level: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), level, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_sample_without_label_is_refused_up_front(tmp_path):
    _foreign(tmp_path, [{"__key__": "a", "png": _png(10), "cls": b"1"}, {"__key__": "b", "png": _png(20)}])
    with pytest.raises(ValueError) as e:
        make(tmp_path, tmp=tmp_path / "idx")
    assert "x-000.tar" in one_line(e) and "'b.png'" in one_line(e)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_png_and_jpeg_members_are_read(tmp_path, backend):
    _foreign(tmp_path, [{"__key__": f"k{i}", "png" if i % 2 else "jpeg": _png(40 * i), "cls": str(i).encode()}
                        for i in range(5)])
    loader = make(tmp_path, tmp=tmp_path / "idx", backend=backend, return_keys=True, num_threads=1)
    got = {k: int(lbl) for _, labels, keys in loader for lbl, k in zip(labels, keys)}
    assert got == {f"k{i}": i for i in range(5)}
