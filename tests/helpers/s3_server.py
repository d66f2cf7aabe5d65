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
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0" if self.auth else "inf"}
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self
            except OSError as err:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from err
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

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
