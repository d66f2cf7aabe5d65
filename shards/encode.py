"""One input file -> one stored baseline RGB JPEG (or a reject reason); runs in pool workers.

Originals that are already baseline RGB JPEGs, upright (no EXIF orientation other than 1)
and needing no resize are copied byte for byte (after a full decode proves they are
intact). Everything else is decoded (JPEG with PIL's draft mode, which lets libjpeg scale
down by 1/2..1/8 while decoding), turned upright by its EXIF orientation, converted to RGB
(16-bit greyscale scaled to 8 bits, not clipped; animations give their first frame),
resized so the shorter side is `shorter_side` (never up), and re-encoded without EXIF: every
reader (DALI applies the orientation tag, PIL does not) then sees the same upright pixels,
of the size the manifest gives.

Reading retries transient I/O errors (EIO, ESTALE, timeouts: NFS and network filesystems
have hiccups) with back-off before giving up; the reject reason of a file that could not be
read starts with "unreadable:", and a re-run retries those (shards/pack.py).
"""
from __future__ import annotations

import errno
import io
import logging
import os
import stat
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from shards.writer import sample_blob

log = logging.getLogger(__name__)

# stats.json is computed from a grid of STATS_GRID x STATS_GRID pixels of each stored train
# image (nearest-neighbour picks); the sums, not the pixels, travel back to the packer.
STATS_GRID = 32

UNREADABLE = "unreadable: "  # the prefix of reasons a re-run retries
# errnos worth retrying: the file may well read on the next try (network filesystems, busy disks)
TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "ESTALE", "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ENOLCK", "ECONNRESET", "ECONNABORTED",
    "ENOTCONN", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EREMOTEIO",
) if hasattr(errno, name))
RETRY_DELAYS_S = (0.1, 0.3, 1.0, 3.0)  # sleeps between the 5 tries of a transient error

ORIENTATION_TAG = 0x0112
_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int
    copied: bool
    # sufficient statistics of the sampled pixels in [0, 1]: count, sum[3], outer-product sum[3x3]
    count: int
    sum: tuple[float, ...]
    outer: tuple[float, ...]


def target_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """Size with the shorter side at `shorter_side` (aspect kept); unchanged if already smaller
    or if `shorter_side` is 0."""
    short = min(width, height)
    if shorter_side <= 0 or short <= shorter_side:
        return width, height
    scale = shorter_side / short
    if width <= height:
        return shorter_side, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter_side


def _is_baseline_rgb_jpeg(img: Image.Image) -> bool:
    return img.format == "JPEG" and img.mode == "RGB" and not (
        img.info.get("progressive") or img.info.get("progression")
    )


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block: treat as upright, the pixels still decode
        return 1
    return value if value in _TRANSPOSE else 1


def _pixel_stats(rgb: Image.Image) -> tuple[int, tuple, tuple]:
    grid = np.asarray(rgb.resize((STATS_GRID, STATS_GRID), Image.NEAREST)).reshape(-1, 3)
    a = np.ones((len(grid), 4))
    np.multiply(grid, 1 / 255.0, out=a[:, :3])
    m = a.T @ a  # one product: the outer-product sum [:3, :3] and the sums [3, :3]
    return len(grid), tuple(m[3, :3].tolist()), tuple(m[:3, :3].ravel().tolist())


def _errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def read_source(path: str, retry_delays: tuple[float, ...] = RETRY_DELAYS_S) -> bytes | str:
    """The file's bytes, or a reject reason. Transient errors are retried after each delay of
    `retry_delays`; a FIFO or device is never read (opened non-blocking, refused by fstat)."""
    for attempt in range(len(retry_delays) + 1):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return "not a regular file (it changed since the tree was listed)"
                return f.read()
        except FileNotFoundError:
            return f"{UNREADABLE}no such file (it vanished after the tree was listed)"
        except IsADirectoryError:
            return "a directory, not an image file (it changed since the tree was listed)"
        except OSError as e:
            tries = f", after {attempt + 1} tries" if attempt else ""
            if e.errno not in TRANSIENT_ERRNOS or attempt == len(retry_delays):
                return f"{UNREADABLE}{e.strerror or e} ({_errno_name(e)}{tries})"
            delay = retry_delays[attempt]
            log.warning("%s: %s (%s); retry %d of %d in %g s", path, e.strerror, _errno_name(e), attempt + 1,
                        len(retry_delays), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit greyscale: scale, do not clip at 255
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what PIL asks for; the alpha is then dropped as for RGBA
    return img.convert("RGB")


def encode(path: str, key: str, shorter_side: int, quality: int, want_stats: bool,
           clock: dict[str, float] | None = None) -> Encoded | str:
    """Encode one file; returns the Encoded sample or a one-line reject reason. `clock`, when
    given, accumulates the seconds of each stage (read, decode, resize, encode, stats)."""
    t = time.perf_counter()
    data = read_source(path)
    if clock is not None:
        _tick(clock, "read", t)
    if isinstance(data, str):
        return data
    return encode_bytes(data, shorter_side, quality, want_stats, clock)


def encode_bytes(data: bytes, shorter_side: int, quality: int, want_stats: bool,
                 clock: dict[str, float] | None = None) -> Encoded | str:
    """`encode` of a file's bytes."""
    if not data:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb-size warnings, palette transparency: handled here
            return _encode(data, shorter_side, quality, want_stats, clock, time.perf_counter())
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except MemoryError:
        return "out of memory while decoding (too large for this machine's free memory)"
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt image ({e})"
    except Exception as e:  # any decoder failure on a bad file is that file's reject, never the job's end
        return f"truncated or corrupt image ({type(e).__name__}: {e})"


def _tick(clock: dict[str, float], stage: str, t: float) -> float:
    now = time.perf_counter()
    clock[stage] = clock.get(stage, 0.0) + now - t
    return now


def _encode(data: bytes, shorter_side: int, quality: int, want_stats: bool, clock: dict | None, t: float) -> Encoded:
    with Image.open(io.BytesIO(data)) as img:
        orientation = _orientation(img)
        turned = orientation in (5, 6, 7, 8)  # stored sideways: width and height swap
        upright = (img.height, img.width) if turned else img.size
        size = target_size(*upright, shorter_side)
        resize = size != upright
        if resize and img.format == "JPEG":
            img.draft("RGB", (size[1], size[0]) if turned else size)  # smallest libjpeg scale >= size
        img.load()
        if img.format != "JPEG":  # PNG and WebP may carry EXIF after the image data
            orientation = _orientation(img)
        copy = _is_baseline_rgb_jpeg(img) and orientation == 1 and not resize
        rgb = _to_rgb(img)
        if orientation != 1:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
        if clock is not None:
            t = _tick(clock, "decode", t)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.BILINEAR)
        if clock is not None:
            t = _tick(clock, "resize", t)
        if copy:
            jpeg = data
        else:
            buf = io.BytesIO()
            rgb.save(buf, "JPEG", quality=quality)
            jpeg = buf.getvalue()
        if clock is not None:
            t = _tick(clock, "encode", t)
        count, s, o = _pixel_stats(rgb) if want_stats else (0, (), ())
        if clock is not None:
            _tick(clock, "stats", t)
        width, height = rgb.size
    return Encoded(jpeg, width, height, copy, count, s, o)


def encode_job(job: tuple[str, str, int, int, int, bool]) -> tuple[int, tuple | str]:
    """Pool entry point for (path, key, label, shorter_side, quality, want_stats): (input
    bytes, result), the result being a reject reason or (tar bytes of the sample's members,
    their index entries, width, height, jpeg bytes, count, sum, outer). The sample's tar
    members are built here, so the single writer only appends bytes."""
    path, key, label, shorter_side, quality, want_stats = job
    data = read_source(path)
    if isinstance(data, str):
        return 0, data
    res = encode_bytes(data, shorter_side, quality, want_stats)
    if isinstance(res, str):
        return len(data), res
    blob, members = sample_blob(key, res.jpeg, label)
    return len(data), (blob, members, res.width, res.height, len(res.jpeg), res.count, res.sum, res.outer)
