"""Packing into and verifying from object storage, against a real S3 server (moto on loopback):
the bucket ends with the local pack's bytes, a SIGKILLed upload resumes from the bucket without
uploading a committed shard twice, verify reads the bucket, and storage errors are one line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from helpers.s3_server import S3Server

from shards.layouts import MANIFEST_FILE, PACK_DIR, SHARDS_FILE, split_tars
from shards.pack import build
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]
DEMO_SETTINGS = ["--shorter-side", "64", "--shard-size-mb", "0.05", "--workers", "2"]  # the demo_shards fixture's


def s3(server: S3Server):
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")


def bucket_objects(server: S3Server, uri: str) -> dict[str, bytes]:
    """Every object under `uri` (`s3://bucket/prefix`), by key relative to the prefix."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client, found = s3(server), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/") or obj["Key"] == prefix.rstrip("/"):
                continue  # a folder marker (pyarrow keeps one where the store-check probe was deleted)
            found[obj["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shards_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_pack_to_s3_holds_the_local_packs_bytes_and_verifies(demo_tree: Path, demo_shards: Path, s3_server: S3Server,
                                                            s3_bucket: str, tmp_path: Path) -> None:
    out, work = f"{s3_bucket}/imagenet/shards", tmp_path / "work"
    t0 = time.perf_counter()
    summary = build(demo_tree, out, shorter_side=64, shard_size_mb=0.05, workers=2, progress=False, work_dir=work)
    wall = time.perf_counter() - t0
    shards = len(split_tars(demo_shards, "train")) + len(split_tars(demo_shards, "val"))
    assert (summary.packed, summary.shards, summary.uploaded, summary.kept) == (290, shards, shards, 0)
    print(f"\npack to s3: {wall:.1f} s, {summary.upload_bytes / 1e6:.2f} MB uploaded at "
          f"{summary.upload_bytes / 1e6 / summary.upload_s:.1f} MB/s")
    # every object, journal included, is the local pack's file byte for byte; nothing else
    objects, files = bucket_objects(s3_server, out), local_files(demo_shards)
    assert sorted(objects) == sorted(files)
    for key, data in files.items():
        assert objects[key] == data, key
    assert json.loads(objects[f"{PACK_DIR}/state.json"])["complete"] is True
    assert not work.exists()  # the work directory held one shard at a time and is gone

    report = verify(out, workers=1)
    assert report.ok and (report.samples, report.shards) == (290, shards), report.problems

    again = build(demo_tree, out, shorter_side=64, shard_size_mb=0.05, workers=1, progress=False, work_dir=work)
    assert (again.uploaded, again.kept) == (0, shards)  # a finished set: nothing re-encoded or re-sent
    with pytest.raises(ValueError, match=rf"{re.escape(out)}: already holds shards .* other settings "
                                         r"\(shorter_side differ\).*--overwrite"):
        build(demo_tree, out, shorter_side=32, shard_size_mb=0.05, workers=1, progress=False, work_dir=work)

    # one object overwritten with corrupted bytes (same length): verify names the shard
    bucket, _, prefix = out.removeprefix("s3://").partition("/")
    key = f"{prefix}/train/shard-000002.tar"
    data = bytearray(objects["train/shard-000002.tar"])
    data[2048:2064] = bytes(16)
    s3(s3_server).put_object(Bucket=bucket, Key=key, Body=bytes(data))
    res = shards_cli("verify", out, "--workers", "1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "train/shard-000002.tar: sha256 " in res.stdout and f"!= {SHARDS_FILE}" in res.stdout
    assert "FAILED" in res.stdout.splitlines()[-1]
    assert all("shard-000002.tar" in line for line in res.stdout.splitlines()[:-1]), res.stdout


def test_sigkilled_upload_resumes_from_the_bucket_on_another_machine(demo_tree: Path, demo_shards: Path,
                                                                     s3_server: S3Server, s3_bucket: str,
                                                                     tmp_path: Path) -> None:
    out = f"{s3_bucket}/shards"
    bucket = s3_bucket.removeprefix("s3://")
    client = s3(s3_server)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})  # every PUT is kept
    cmd = ["build", "--source", str(demo_tree), "--out", out, *DEMO_SETTINGS, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "shards", *cmd, "--work-dir", str(tmp_path / "machine-a")],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = f"shards/{PACK_DIR}/train/shard-000003.tar.json"
    deadline = time.monotonic() + 120
    try:
        while client.list_objects_v2(Bucket=bucket, Prefix=marker)["KeyCount"] == 0:
            assert proc.poll() is None, f"packer ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "packer made no progress in 120 s"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the packer, its pool and its upload thread
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = bucket_objects(s3_server, out)
    assert MANIFEST_FILE not in before  # no set visible before it is whole
    committed = [k.removeprefix(f"{PACK_DIR}/").removesuffix(".json") for k in before  # the commit markers
                 if (k.startswith(f"{PACK_DIR}/train/") or k.startswith(f"{PACK_DIR}/val/")) and k.endswith(".json")]
    total = len(split_tars(demo_shards, "train")) + len(split_tars(demo_shards, "val"))
    assert 4 <= len(committed) < total

    # the re-run starts from an empty work directory (another machine): the bucket is the journal
    res = shards_cli(*cmd, "--work-dir", str(tmp_path / "machine-b"))
    assert res.returncode == 0, res.stderr
    m = re.search(r"uploaded (\d+) shards .*, (\d+) already there", res.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (total - len(committed), len(committed)), res.stdout

    objects, files = bucket_objects(s3_server, out), local_files(demo_shards)
    assert sorted(objects) == sorted(files)
    for key, data in files.items():
        assert objects[key] == data, key
    versions: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix="shards/"):
        for v in page.get("Versions", []):
            versions[v["Key"].removeprefix("shards/")] = versions.get(v["Key"].removeprefix("shards/"), 0) + 1
    for shard in committed:  # uploaded once, before the kill; none again
        idx = shard.removesuffix(".tar") + ".idx"
        part, record = f"{PACK_DIR}/{shard}.parquet", f"{PACK_DIR}/{shard}.json"
        assert (versions[shard], versions[idx], versions[part], versions[record]) == (1, 1, 1, 1), shard


@pytest.fixture(scope="module")
def locked_bucket() -> tuple[S3Server, dict[str, str]]:
    """A server that enforces IAM, a bucket on it, and the keys of a user with no S3 rights."""
    server = S3Server(auth=True).start()
    try:
        # the next three calls run unauthenticated (moto's reset-auth), then IAM is enforced
        urllib.request.urlopen(urllib.request.Request(server.endpoint + "/moto-api/reset-auth", data=b"3",
                                                      method="POST", headers={"Content-Type": "text/plain"})).close()
        admin = dict(endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="admin",
                     aws_secret_access_key="admin")
        boto3.client("s3", **admin).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="no-s3-rights")
        key = iam.create_access_key(UserName="no-s3-rights")["AccessKey"]
        yield server, {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                       "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "access denied"])
def test_storage_errors_are_one_line_before_any_work(case: str, demo_tree: Path, s3_bucket: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    out, env, fragment = f"{s3_bucket}-missing/shards", {}, "does not exist"
    if case == "unreachable endpoint":
        out, env, fragment = f"{s3_bucket}/shards", {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "cannot reach"
    elif case == "access denied":
        out, env, fragment = "s3://locked/shards", request.getfixturevalue("locked_bucket")[1], "access denied"
    work = tmp_path / "work"
    t0 = time.monotonic()
    res = shards_cli("build", "--source", str(demo_tree), "--out", out, "--work-dir", str(work), *DEMO_SETTINGS,
                     env=env, timeout=60)
    elapsed = time.monotonic() - t0
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert out in lines[0] and fragment in lines[0], lines[0]
    assert not work.exists()  # refused before any encoding
    assert elapsed < 20, f"{case}: {elapsed:.1f} s"
    if case == "missing bucket":  # verify on a URI reports the same way
        res = shards_cli("verify", out, env=env, timeout=60)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and out in res.stderr, res.stderr


def test_source_must_be_local(tmp_path: Path) -> None:
    res = shards_cli("build", "--source", "s3://bucket/imagenet", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("error: --source s3://bucket/imagenet: must be a local directory; copy the tree "
                                  "locally first (e.g. aws s3 sync s3://bucket/imagenet /data/imagenet) "
                                  "and pass that path")
