"""A real S3 endpoint on loopback: moto's server in a child process, for the tests (the
`s3_server` fixture in tests/conftest.py starts and stops it) and the bench's staging part.
`LocalS3(auth=True)` checks credentials and IAM policies."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

KEY_ID, SECRET = "testing-key", "testing-secret"


def terminate(proc: subprocess.Popen | None) -> None:
    """Stop a server process: SIGTERM, then SIGKILL after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, probe, what: str, timeout_s: float = 30) -> None:
    """Call `probe()` until it stops raising OSError; fail with `what` if the server exits or
    `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            probe()
            return
        except OSError as err:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from err
            time.sleep(0.1)


@dataclass
class LocalS3:
    """moto's S3 server (`moto_server`) on a free port of 127.0.0.1, in a child process.

    An IP-literal endpoint, so DALI's S3 reader uses path-style requests. `auth=True`
    checks credentials and IAM policies (moto's INITIAL_NO_AUTH_ACTION_COUNT=0)."""

    auth: bool = False
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalS3:
        self.port = free_port()
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0" if self.auth else "inf"}
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.proc, lambda: urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close(),
                   f"moto_server on {self.endpoint}")
        return self

    def stop(self) -> None:
        terminate(self.proc)

    def env(self) -> dict[str, str]:
        """The AWS variables that point pyarrow, DALI and child processes at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=KEY_ID, secret_key=SECRET,
                                 region="us-east-1", allow_bucket_creation=True, allow_bucket_deletion=True)

    def new_bucket(self, prefix: str = "t") -> str:
        """A fresh, empty bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(name)
        return name


S3Server = LocalS3  # the tests' name


class FramingStore:
    """An S3-compatible store that keeps the SDK's chunk framing: a loopback proxy in front of
    a `LocalS3` that passes every request on, except that a body sent with
    `Content-Encoding: aws-chunked` (the AWS SDKs' default since 2025: chunk sizes, the data,
    a trailing CRC checksum) is stored as it came, framing and all, the way s3rver and other
    stores that do not decode it do. Everything else (listing, ranged reads, multipart) is the
    real moto server's answer.

    `mode="truncate"` models a store that damages bodies some other way (drops the last byte
    of every upload), which no setting fixes."""

    def __init__(self, upstream: LocalS3, mode: str = "framing") -> None:
        self.upstream, self.mode = upstream, mode
        self.framed_bodies = 0  # uploads that arrived aws-chunked (and were kept so)
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FramingStore:
        import http.client
        import http.server
        import threading

        store = self
        hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                encoding = headers.get("Content-Encoding", headers.get("content-encoding", ""))
                if body and self.command == "PUT":
                    if "aws-chunked" in encoding.lower():  # keep the framing as the object's bytes
                        store.framed_bodies += 1
                        headers = {k: v for k, v in headers.items()
                                   if not k.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum",
                                                                "x-amz-trailer", "x-amz-decoded-content-length",
                                                                "content-encoding", "content-md5"))}
                        headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
                    if store.mode == "truncate":
                        body = body[:-1]
                        headers = {k: v for k, v in headers.items()
                                   if not k.lower().startswith(("x-amz-checksum", "content-md5"))}
                        headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection("127.0.0.1", store.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in hop:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD"
                                 else resp.getheader("Content-Length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="framing-store", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def env(self) -> dict[str, str]:
        return {**self.upstream.env(), "AWS_ENDPOINT_URL": self.endpoint}

    def new_bucket(self, prefix: str = "t") -> str:
        return self.upstream.new_bucket(prefix)


def s3rver_command() -> list[str] | None:
    """How to start s3rver (the Node S3 server that keeps chunk framing), or None: `$S3RVER`
    (its `bin/s3rver.js` or the `.bin/s3rver` link), else `s3rver` on PATH; `node` is needed."""
    import shutil

    node = shutil.which("node")
    found = os.environ.get("S3RVER") or shutil.which("s3rver")
    if node is None or not found or not Path(found).exists():
        return None
    return [node, str(Path(found).resolve())]


@dataclass
class S3rver:
    """s3rver 3.x on a free port of 127.0.0.1 with one bucket, its data in `root`."""

    root: Path
    bucket: str = "s3rver-bucket"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3rver:
        command = s3rver_command()
        if command is None:
            raise RuntimeError("s3rver not found: set S3RVER to its bin/s3rver.js (npm install s3rver@3.7.1)")
        self.port = free_port()
        self.proc = subprocess.Popen([*command, "-d", str(self.root), "-a", "127.0.0.1", "-p", str(self.port), "-s",
                                      "--configure-bucket", self.bucket],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.proc, lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close(),
                   f"s3rver on {self.endpoint}")
        return self

    def stop(self) -> None:
        terminate(self.proc)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
