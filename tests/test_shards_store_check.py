"""Stores that change bytes (issue "Stores that change bytes"): the write/read-back probe,
the upload size check, the packer on such a store and the leftovers it leaves.

The store that keeps the AWS SDK's chunk framing is `FramingStore`, a loopback proxy in front
of the session's moto server that stores `Content-Encoding: aws-chunked` bodies as they came
(what s3rver 3.7.1 does); `mode="truncate"` damages uploads in a way no setting fixes. Where
`node` and s3rver are installed (`S3RVER=.../bin/s3rver.js`), the same flow runs against
s3rver itself."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.s3_server import FramingStore, S3rver, s3rver_command

from shards.location import ChangedUpload, StorageError, resolve
from shards.store_check import CHECKSUM_SETTINGS, require

ROOT = Path(__file__).resolve().parents[1]
FIX = [f"{k}={v}" for k, v in CHECKSUM_SETTINGS.items()]


@pytest.fixture
def framing_store(s3_server):
    store = FramingStore(s3_server).start()
    yield store
    store.stop()


@pytest.fixture
def sdk_defaults(monkeypatch):
    """This process as a user's shell has it: the SDK's default checksums (neither setting)."""
    for key in CHECKSUM_SETTINGS:
        monkeypatch.delenv(key, raising=False)


def cli(module: str, *args: str, env: dict[str, str], settings: bool = False) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in CHECKSUM_SETTINGS}
    full.update(env)
    if settings:
        full.update(CHECKSUM_SETTINGS)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=full, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_check_store_names_kept_framing_and_the_settings_that_fix_it(framing_store, s3_server):
    uri = f"s3://{framing_store.new_bucket()}/out"
    found = cli("shards", "check-store", uri, env=framing_store.env())
    assert found.returncode == 1, found.stderr
    line = found.stdout.strip()
    assert "\n" not in line and line.startswith(f"{uri}: ")
    assert "aws-chunked framing" in line and all(f in line for f in FIX), line
    assert framing_store.framed_bodies > 0  # the probe went through the SDK's default (aws-chunked) upload

    with_fix = cli("shards", "check-store", uri, env=framing_store.env(), settings=True)
    assert with_fix.returncode == 0 and with_fix.stdout.startswith(f"{uri}: OK"), with_fix.stdout + with_fix.stderr
    plain = cli("shards", "check-store", f"s3://{s3_server.new_bucket()}/out", env=s3_server.env())
    assert plain.returncode == 0 and ": OK" in plain.stdout  # moto decodes the framing: nothing to fix
    assert not [f for f in resolve(uri).list() if f.base_name.startswith(".alexnet-store-check")]  # probes deleted


def test_a_store_that_damages_bytes_otherwise_is_refused_and_nothing_applied(s3_server, sdk_defaults, monkeypatch):
    store = FramingStore(s3_server, mode="truncate").start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint)
        uri = f"s3://{store.new_bucket()}/runs"
        with pytest.raises(StorageError) as exc:
            require(uri)
    finally:
        store.stop()
    message = str(exc.value)
    assert message.startswith(f"{uri}: the store changed the bytes written") and "\n" not in message
    assert "does not fix it" in message and "another store" in message
    assert not any(k in os.environ for k in CHECKSUM_SETTINGS)  # a setting that does not help is not kept


def test_require_applies_the_settings_for_the_process_when_they_fix_the_store(framing_store, sdk_defaults,
                                                                              monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", framing_store.endpoint)
    uri = f"s3://{framing_store.new_bucket()}/runs"
    found = require(uri)
    assert found.ok and found.applied and all(os.environ.get(k) == v for k, v in CHECKSUM_SETTINGS.items())
    assert "aws-chunked framing" in found.line() and "for this process" in found.line()
    data = bytes(range(256)) * 1000
    (resolve(uri) / "after.bin").write_bytes(data)  # a client made now keeps bytes
    assert (resolve(uri) / "after.bin").read_bytes() == data


def test_an_upload_the_store_changed_is_named_and_never_counted_saved(framing_store, sdk_defaults, monkeypatch,
                                                                      tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", framing_store.endpoint)
    run = resolve(f"s3://{framing_store.new_bucket()}/runs/demo")
    data = b"{}\n" * 5000
    with pytest.raises(ChangedUpload) as exc:
        (run / "state.json").write_bytes(data)
    message = str(exc.value)
    assert message.startswith(f"{run.uri}/state.json: the store holds ")
    assert f"where {len(data)} were written" in message
    assert "chunk framing" in message and f"check-store {run.uri}" in message
    local = tmp_path / "checkpoint.pt"
    local.write_bytes(os.urandom(300_000))
    with pytest.raises(ChangedUpload, match="epoch-0001/checkpoint.pt: the store holds"):
        (run / "epoch-0001" / "checkpoint.pt").upload(local)
    (run / "raw.bin").write_bytes(data, verify=False)  # what the check guards against: a changed object
    assert (run / "raw.bin").read_bytes() != data


def test_pack_on_a_framing_store_applies_the_fix_and_overwrite_clears_corrupt_leftovers(
        framing_store, demo_tree, sdk_defaults, monkeypatch, tmp_path):
    out = f"s3://{framing_store.new_bucket()}/shards"
    build = ["build", "--source", str(demo_tree), "--out", out, "--shorter-side", "64", "--shard-size-mb", "0.05",
             "--workers", "2", "--no-progress", "--work-dir", str(tmp_path / "work")]
    # leftovers of a pack on such a store under the SDK's defaults: framing kept in every object
    monkeypatch.setenv("AWS_ENDPOINT_URL", framing_store.endpoint)
    loc = resolve(out)
    for name, data in ((".pack/state.json", b'{"fingerprint": "x", "settings": {}, "complete": false}'),
                       (".pack/train/shard-000000.tar.json", b'{"shard": "shard-000000.tar"}'),
                       ("train/shard-000000.tar", b"x" * 1000), ("train/shard-000000.idx", b"k 0 10\n")):
        (loc / name).write_bytes(data, verify=False)
    assert (loc / ".pack/state.json").read_bytes() != b'{"fingerprint": "x", "settings": {}, "complete": false}'

    refused = cli("shards", *build, env=framing_store.env(), settings=True)
    assert refused.returncode == 2
    line = one_line(refused)
    assert f"{out}/.pack/state.json: corrupt" in line and "--overwrite" in line

    packed = cli("shards", *build, "--overwrite", env=framing_store.env())
    assert packed.returncode == 0, packed.stderr
    assert f"{out}: this store keeps the SDK's chunk framing" in packed.stderr and all(f in packed.stderr for f in FIX)
    assert "packed 290 images" in packed.stdout and "0 already there" in packed.stdout, packed.stdout

    verified = cli("shards", "verify", out, "--workers", "1", env=framing_store.env(), settings=True)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout[-2000:]


@pytest.mark.skipif(s3rver_command() is None,
                    reason="s3rver not installed: `npm install s3rver@3.7.1` and set S3RVER=<its bin/s3rver.js>")
def test_s3rver_itself_is_refused_with_defaults_and_packs_with_the_fix(demo_tree, tmp_path):
    server = S3rver(tmp_path / "s3rver").start()
    try:
        out = f"s3://{server.bucket}/shards"
        found = cli("shards", "check-store", out, env=server.env())
        assert found.returncode == 1 and "aws-chunked framing" in found.stdout, found.stdout + found.stderr
        packed = cli("shards", "build", "--source", str(demo_tree), "--out", out, "--shorter-side", "64",
                     "--shard-size-mb", "0.05", "--workers", "2", "--no-progress", env=server.env())
        assert packed.returncode == 0 and "chunk framing" in packed.stderr, packed.stderr
        verified = cli("shards", "verify", out, "--workers", "1", env=server.env(), settings=True)
        assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout[-2000:]
    finally:
        server.stop()
