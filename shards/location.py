"""Where things live: the one place a location (a path or a URI) becomes a filesystem.

Every location the project takes (`--out`, `shards_dir`, `storage_path`, `SHARDS_DIR`) is a
filesystem path or a URI that `pyarrow.fs.FileSystem.from_uri` resolves (`s3://bucket/prefix`,
`gs://bucket/prefix`, `file:///abs/path`). S3 endpoint, region and credentials come from the
standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION` / `AWS_DEFAULT_REGION`) and the usual credential chain: `from_uri` reads them,
a bare `pyarrow.fs.S3FileSystem()` would not read the endpoint.

    loc = resolve("s3://bucket/shards")
    (loc / "train").list()           # names under it
    (loc / "stats.json").read_bytes()
    (loc / "summary.json").write_bytes(b"...")   # complete or absent, local or remote

Errors name the URI and what to do, in one line (`StorageError`, an OSError).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class StorageError(OSError):
    """A location that cannot be used: the message is one line naming it and what to do."""


class ChangedUpload(StorageError):
    """An object the store holds otherwise than it was written (size checked after upload)."""


class CorruptFile(StorageError):
    """One of the project's own files (JSON, Parquet) that does not parse: named, with the way out."""


def corrupt_file(uri: str, err: BaseException, way_out: str) -> CorruptFile:
    """One line: the file, that it does not parse (and the parser's first words), the way out."""
    detail = " ".join(str(err).split())[:120]
    return CorruptFile(f"{uri}: corrupt, not as it was written ({type(err).__name__}: {detail}); {way_out}")


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` strings (`file://` included); False for plain paths."""
    return bool(_SCHEME.match(str(location)))


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI that is not on the local filesystem (`s3://`, `gs://`, ...)."""
    m = _SCHEME.match(str(location))
    return bool(m) and m.group(1).lower() != "file"


def normalise(location: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A plain path made absolute (against `base`, default the cwd; `~` expanded); a URI as
    written, without a trailing slash. Relative paths must be resolved before they travel
    to Ray workers, whose cwd is elsewhere."""
    text = os.fspath(location)
    if is_uri(text):
        return text.rstrip("/") if not text.endswith("://") else text
    return str((Path(base or Path.cwd()) / os.path.expanduser(text)).resolve())


@dataclass(frozen=True)
class Location:
    """A resolved location: the filesystem, the path inside it, and the string the user gave."""

    uri: str
    fs: pafs.FileSystem
    path: str

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> Location:
        name = str(name).strip("/")
        return Location(f"{self.uri.rstrip('/')}/{name}", self.fs, f"{self.path.rstrip('/')}/{name}")

    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def local_path(self) -> Path:
        """The local `Path` (only for local locations)."""
        if self.remote:
            raise ValueError(f"{self.uri}: not a local path")
        return Path(self.path)

    # ---------------------------------------------------------------- reading
    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as err:
            raise storage_error(err, self.uri) from None

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        return int(self.info().size)

    def list(self) -> list[pafs.FileInfo]:
        """The files and folders directly under this location, sorted by name ([] when absent)."""
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as err:
            raise storage_error(err, self.uri) from None
        return sorted(found, key=lambda f: f.base_name)

    def read_bytes(self) -> bytes:
        try:  # a random-access file reads in large ranged requests (a stream: many small ones)
            with self.fs.open_input_file(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as err:
            raise storage_error(err, self.uri) from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self, way_out: str) -> Any:
        """The JSON document here (FileNotFoundError when absent); CorruptFile naming it and
        `way_out` when it does not parse."""
        data = self.read_bytes()
        try:
            return json.loads(data)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise corrupt_file(self.uri, err, way_out) from None

    def read_parquet(self, columns: list[str] | None, way_out: str) -> Any:
        """The Parquet table here (only `columns`); CorruptFile naming it and `way_out` when it
        does not parse."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(self.path, columns=columns, filesystem=self.fs)
        except FileNotFoundError:
            raise
        except pa.ArrowException as err:
            raise corrupt_file(self.uri, err, way_out) from None
        except OSError as err:
            raise storage_error(err, self.uri) from None

    # ---------------------------------------------------------------- writing
    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as err:
            raise storage_error(err, self.uri) from None

    def write_bytes(self, data: bytes, verify: bool = True) -> None:
        """Write the whole object: complete or absent. Locally a temp file in the same folder
        is fsynced and renamed over the name; an object store publishes an object only when
        its upload completes, and the size it then holds is checked (`verify`)."""
        if not self.remote:
            from shards.index import atomic_write_bytes

            atomic_write_bytes(Path(self.path), data)
            return
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as err:
            raise storage_error(err, self.uri) from None
        if verify:
            self.check_stored(len(data))

    def check_stored(self, written: int) -> None:
        """ChangedUpload unless the store holds `written` bytes here: an object store that
        changed an upload (kept the SDK's chunk framing, cut it) is named, never counted saved."""
        held = self.size() if self.is_file() else None
        if held != written:
            what = "nothing" if held is None else f"{held} bytes"
            framing = " (a store that keeps the AWS SDK's chunk framing stores a few bytes more)" if (
                held is not None and 0 < held - written <= 128 + written // 1000) else ""
            raise ChangedUpload(f"{self.uri}: the store holds {what} where {written} were written{framing}; "
                                f"not counted as saved: run `python -m shards check-store {self.parent_uri}`")

    @property
    def parent_uri(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[0]

    def upload(self, local: Path) -> None:
        """Copy a local file here (complete or absent, as `write_bytes`; the size checked)."""
        if not self.remote:
            import shutil

            tmp = Path(self.path).with_name(f".{self.name}.{os.getpid()}.tmp")
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        try:
            pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        except OSError as err:
            raise storage_error(err, self.uri) from None
        self.check_stored(local.stat().st_size)

    def download(self, local: Path) -> None:
        """Copy this file to the local path `local` (not atomic: callers write a temp name)."""
        try:
            pafs.copy_files(self.path, str(local), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except FileNotFoundError:
            raise
        except OSError as err:
            raise storage_error(err, self.uri) from None

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise storage_error(err, self.uri) from None


def resolve(location: str | os.PathLike) -> Location:
    """The filesystem and path of `location` (a path or a URI); one-line StorageError when the
    URI cannot be resolved (unknown scheme, bad bucket name, unusable credentials)."""
    text = normalise(location)
    if not is_uri(text):
        return Location(text, pafs.LocalFileSystem(), text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as err:
        raise storage_error(err, text) from None
    return Location(text, fs, path.rstrip("/"))


# What object stores answer, mapped to what the user should do. Matched on pyarrow's messages.
_HINTS = (  # checked in order: the first match wins
    (re.compile(r"curlCode: (6|7|28)|Couldn't connect|Could not connect|Could not resolve|Connection refused", re.I),
     "cannot reach the storage endpoint; check AWS_ENDPOINT_URL (now {endpoint}) and the network"),
    (re.compile(r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|"
                r"No credentials|Unable to locate credentials|MISSING_AUTHENTICATION_TOKEN", re.I),
     "the credentials were refused or are missing; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
     "(or AWS_PROFILE, an instance role)"),
    (re.compile(r"ACCESS_DENIED|AccessDenied|Access Denied|Forbidden|HTTP status 403", re.I),
     "access denied; grant this identity read (and for outputs write) on the bucket and prefix"),
    (re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|specified bucket does not exist", re.I),
     "the bucket does not exist; create it or fix the bucket name"),
    (re.compile(r"Unrecognized filesystem type|unknown scheme|not supported", re.I),
     "not a filesystem pyarrow knows; use a path, file://, s3:// or gs://"),
)


def storage_error(err: BaseException, uri: str) -> StorageError:
    """One line: the URI, what went wrong in plain words, and pyarrow's own first line."""
    raw = " ".join(str(err).split())
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "unset: AWS's own endpoint"
    for pattern, hint in _HINTS:
        if pattern.search(raw):
            return StorageError(f"{uri}: {hint.format(endpoint=endpoint)} ({raw[:200]})")
    return StorageError(f"{uri}: {raw[:300]}")


def check_reachable(loc: Location) -> None:
    """Fail early, in one line, when a remote location's bucket cannot be used: endpoint
    unreachable, credentials refused, access denied, bucket missing. A no-op for local paths."""
    if not loc.remote:
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        kind = loc.fs.get_file_info(bucket).type
        if kind != pafs.FileType.NotFound:
            loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))  # list rights
    except OSError as err:
        raise storage_error(err, loc.uri) from None
    if kind == pafs.FileType.NotFound:
        raise StorageError(f"{loc.uri}: the bucket {bucket!r} does not exist (endpoint "
                           f"{os.environ.get('AWS_ENDPOINT_URL') or 'AWS'}); create it or fix the URI")
