"""A real S3 endpoint on loopback for the tests: moto's server in a child process
(`pipeline.bench.staging.LocalS3`, shared with the bench), started and stopped by the
`s3_server` fixture in conftest.py. `S3Server(auth=True)` checks credentials and IAM policies."""
from __future__ import annotations

from pipeline.bench.staging import KEY_ID, SECRET, LocalS3 as S3Server

__all__ = ["KEY_ID", "SECRET", "S3Server"]
