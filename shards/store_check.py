"""Does a store keep what we write? The write/read-back probe every output location passes
before long work starts (`python -m shards check-store URI` runs it alone).

Since botocore/boto3 1.36 and the C++ SDK pyarrow links (January 2025), the AWS SDKs send
uploads as `Content-Encoding: aws-chunked` bodies (chunk sizes, the data, a trailing CRC
checksum). A store that does not decode that framing either refuses the request or, worse,
keeps the framing as the object's bytes: every upload then "succeeds" and every object is
corrupt. The probe writes a small object through the same path big uploads take
(`Location.write_bytes`, pyarrow's multipart output stream), reads it back, compares and
deletes it. Framing it recognises is fixed by asking the SDK for checksums only where the
API requires them (`CHECKSUM_SETTINGS`), applied to this process and its children, and the
probe runs again; anything else is refused in one line naming the location.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

from shards.location import Location, StorageError, check_reachable, resolve

# The SDK settings that stop aws-chunked uploads (and the response checksum check that goes with them).
CHECKSUM_SETTINGS = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                     "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
PROBE_BYTES = 192 * 1024  # three of the SDK's 64 KiB aws-chunked chunks
_FRAMING = re.compile(rb"^[0-9a-fA-F]+(;[^\r\n]*)?\r\n")
_TRAILER = re.compile(rb"\r\n0\r\n(x-amz-checksum-[a-z0-9]+):", re.I)


def settings_line() -> str:
    return " and ".join(f"{k}={v}" for k, v in CHECKSUM_SETTINGS.items())


def settings_applied() -> bool:
    return all(os.environ.get(k) == v for k, v in CHECKSUM_SETTINGS.items())


def what_changed(sent: bytes, got: bytes) -> tuple[str, bool]:
    """(what the store did, in words; whether it is the SDK's chunk framing kept as data)."""
    trailer = _TRAILER.search(got[-256:])
    if _FRAMING.match(got) and (trailer or len(got) > len(sent)) and sent[:1024] in got[:1100]:
        checksum = f" and a trailing {trailer.group(1).decode()}" if trailer else ""
        return (f"it stored the AWS SDK's aws-chunked framing (chunk sizes{checksum}) as the object's bytes: "
                f"{len(got)} bytes for {len(sent)} written"), True
    if len(got) != len(sent):
        return f"it read back {len(got)} bytes for {len(sent)} written", False
    first = next(i for i, (a, b) in enumerate(zip(sent, got)) if a != b)
    return f"it read back different bytes (first difference at byte {first})", False


@dataclass(frozen=True)
class StoreCheck:
    """What the probe found at `uri`: `ok` (it keeps bytes as the environment now stands),
    `problem` (what it changed, in words), `fixable` (`CHECKSUM_SETTINGS` make it keep them),
    `applied` (this process switched to them and the probe then passed)."""

    uri: str
    ok: bool
    problem: str = ""
    fixable: bool = False
    applied: bool = False

    def line(self) -> str:
        if self.ok and not self.applied:
            return (f"{self.uri}: OK: a {PROBE_BYTES // 1024} KiB object written through the multipart path "
                    "reads back identical")
        if self.applied:
            return (f"{self.uri}: this store keeps the SDK's chunk framing in uploads ({self.problem}); "
                    f"set {settings_line()} for this process and its workers, and the probe then read back identical; "
                    "export both to silence this")
        if self.fixable:
            return (f"{self.uri}: the store changed the bytes written: {self.problem}; "
                    f"set {settings_line()} (it reads back identical with them)")
        fix = (f"with {settings_line()} set; use another store or endpoint" if settings_applied()
               else f"setting {settings_line()} does not fix it; use another store or endpoint")
        return f"{self.uri}: the store changed the bytes written: {self.problem}, {fix}"


def probe(loc: Location) -> tuple[str, bool] | None:
    """Write, read back and delete one object under `loc`: None when it came back identical,
    else (what changed, whether it is chunk framing)."""
    if not loc.remote:
        loc.mkdir()
    obj = loc / f".alexnet-store-check-{uuid.uuid4().hex[:12]}"
    sent = b"".join(i.to_bytes(4, "little") for i in range(PROBE_BYTES // 4))
    try:
        obj.write_bytes(sent, verify=False)
        got = obj.read_bytes()
    finally:
        obj.delete()
    return None if got == sent else what_changed(sent, got)


def check_store(location: str | os.PathLike | Location, apply: bool = True) -> StoreCheck:
    """Probe `location`. When the store keeps chunk framing and `apply`, set
    `CHECKSUM_SETTINGS` in this process's environment (filesystems resolved from now on, and
    child processes, use them) and probe again. Never raises for changed bytes: see `require`."""
    loc = location if isinstance(location, Location) else resolve(location)
    check_reachable(loc)
    if not loc.remote:
        found = probe(loc)
        return StoreCheck(loc.uri, ok=found is None, problem="" if found is None else found[0])
    found = probe(loc)
    if found is None:
        return StoreCheck(loc.uri, ok=True)
    problem, framing = found
    if not framing or settings_applied():
        return StoreCheck(loc.uri, ok=False, problem=problem)
    saved = {k: os.environ.get(k) for k in CHECKSUM_SETTINGS}
    os.environ.update(CHECKSUM_SETTINGS)
    fixed = probe(resolve(loc.uri)) is None  # a new client: the SDK reads the settings when it is made
    if apply and fixed:
        return StoreCheck(loc.uri, ok=True, problem=problem, fixable=True, applied=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return StoreCheck(loc.uri, ok=False, problem=problem, fixable=fixed)


def require(location: str | os.PathLike | Location) -> StoreCheck:
    """The pre-flight of an output location: returns the check (print `line()` when
    `applied`); StorageError, one line naming the location and the fix, when the store does
    not keep what is written."""
    found = check_store(location)
    if not found.ok:
        raise StorageError(found.line())
    return found


def applied_settings() -> dict[str, str]:
    """The checksum settings this process runs with, to hand to Ray's workers."""
    return {k: os.environ[k] for k in CHECKSUM_SETTINGS if k in os.environ}
