"""The carry plan for `make gpu-check` on a lent GPU machine: CUDA torch but no DALI and no
registry, at most 64 MiB carried per call, about 15 minutes of machine time for everything.
Standard library only: on the device it runs before anything it unpacks is importable.

    python -m tools.gpu_bundle prepare [--python 3.12] [--out .gpu-wheels] [--preset 9e]
    python -m tools.gpu_bundle plan [--out .gpu-wheels] [--budget-s 300]

prepare (here): pip-downloads the exact pins of `tools/gpu-bundle.txt` as wheels for the
device's Python, lays them out as `pip install --target` would, drops what no import reads
(other Pythons' extension modules, C headers, static libraries, command-line tools), and
writes the tree as one xz-compressed tar cut into parts of at most PART_MIB:
`<out>/part-N/bundle.tar.xz.N`, each part folder with `bundle.json` (pins, sizes, sha256s).
plan: the device calls in order, their sizes, and an estimate of the device minutes.
On the device `unpack` (called by `bench.gpu_check`) checks the parts' sha256s and streams
them through lzma and tar into a site folder: no pip, no second copy on disk.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "tools" / "gpu-bundle.txt"
OUT = ROOT / ".gpu-wheels"
DEVICE_PYTHON = "3.12"  # the lent machine's python3 (KINDS: 3.12.3 at /opt/torch/.venv)
PART_MIB = 60  # one call carries at most 64 MiB: a part, its bundle.json and the working tree (`tree_mib`)
CALL_MIB = 64
MIB = 2 ** 20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any")
# What no import on the device reads: dropped from the tree (paths relative to the site folder).
DROP_DIRS = ("nvidia/dali/include", "nvidia/nvimgcodec/include", "nvidia/nvimgcodec/tools", "nvidia/cu13/include")
# nvImageCodec's extensions for formats the shards never hold, whose libraries (nvJPEG2000,
# nvTIFF, OpenCV) are not carried: each would log an error at every start and decode nothing.
DROP_FILES = tuple(f"nvidia/nvimgcodec/extensions/lib{e}_ext.so*" for e in ("opencv", "nvjpeg2k", "nvtiff", "tiff"))
# The device-minute estimate's stated assumptions (device README: "a minute or more" to start,
# warm 30 s after a call); transfer and call overhead are not published: rough, on the safe side.
START_S = 120.0
CALL_S = 20.0
CARRY_MIB_PER_S = 8.0
UNPACK_MIB_PER_S = 60.0  # lzma + tar of the unpacked tree, one core (this machine: about 80)
DEVICE_S = 15 * 60  # a task's device time, every try included
FIT_S = 10 * 60  # the plan must fit in this, start included, with the last call rerun after it


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and its message, at most 400 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:400]}"


def read_pins(path: Path = PINS) -> list[str]:
    """The `name==version` lines of the pin file, in order."""
    pins = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    pins = [p for p in pins if p]
    bad = [p for p in pins if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-+]+", p)]
    if bad:
        raise SystemExit(f"{path}: {bad[0]!r} is not an exact pin (name==version)")
    return pins


def abi_tag(python: str) -> str:
    return "cpython-" + python.replace(".", "")


# ---------------------------------------------------------------- prepare (here)
def download(pins: list[str], python: str, dest: Path) -> list[Path]:
    """The pinned wheels for `python` on x86-64 Linux (no dependencies resolved: the pins are the list)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    proc = subprocess.run([*cmd, *pins], capture_output=True, text=True)
    if proc.returncode != 0:
        last = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        raise SystemExit(f"gpu-bundle: pip download failed: {last[-1] if last else proc.returncode}")
    wheels = sorted(dest.glob("*.whl"))
    names = {_dist_key(w.name.split("-")[0]) for w in wheels}
    missing = [p for p in pins if _dist_key(p.split("==")[0]) not in names]
    if missing:
        raise SystemExit(f"gpu-bundle: no wheel for {', '.join(missing)} (Python {python}, x86-64 Linux)")
    return wheels


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def lay_out(wheels: list[Path], site: Path) -> None:
    """Each wheel's files as `pip install --target site` places them: the `.data/purelib` and
    `.data/platlib` trees at the top, scripts and headers left out."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                target = site.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)


def trim(site: Path, python: str) -> int:
    """Drop what no import on `python` reads; returns the bytes dropped."""
    keep_abi = abi_tag(python) + "-"
    dropped = 0
    doomed = [site / d for d in DROP_DIRS if (site / d).is_dir()]
    doomed += [p for p in site.rglob("__pycache__") if p.is_dir()]
    for f in (f for pattern in DROP_FILES for f in site.glob(pattern) if f.is_file()):
        dropped += f.stat().st_size
        f.unlink()
    for d in doomed:
        dropped += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        shutil.rmtree(d)
    for f in list(site.rglob("*")):
        ext_for_other = ".cpython-3" in f.name and f.name.endswith(".so") and keep_abi not in f.name
        if f.is_file() and (ext_for_other or f.suffix == ".a"):
            dropped += f.stat().st_size
            f.unlink()
    return dropped


class PartWriter(io.RawIOBase):
    """A write stream cut into files of at most `part_bytes`: `<out>/part-N/<name>.N`."""

    def __init__(self, out: Path, name: str, part_bytes: int) -> None:
        self.out, self.name, self.part_bytes = out, name, part_bytes
        self.paths: list[Path] = []
        self._file = None
        self._left = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view, n = memoryview(data), len(data)
        while view:
            if self._left == 0:
                self._roll()
            k = min(self._left, len(view))
            self._file.write(view[:k])
            view, self._left = view[k:], self._left - k
        return n

    def _roll(self) -> None:
        if self._file:
            self._file.close()
        i = len(self.paths)
        path = self.out / f"part-{i}" / f"{self.name}.{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.paths.append(path)
        self._file, self._left = path.open("wb"), self.part_bytes

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        super().close()


def compress(site: Path, out: Path, preset: str, part_mib: float) -> tuple[list[Path], float]:
    """The tree as `bundle.tar.xz` in parts; xz's own (multi-threaded) binary where there is
    one, else Python's lzma. Returns the parts and the seconds it took."""
    t0 = time.perf_counter()
    writer = PartWriter(out, "bundle.tar.xz", int(part_mib * MIB))
    xz = shutil.which("xz")
    if xz:
        tar = subprocess.Popen(["tar", "cf", "-", "--sort=name", "-C", str(site), "."], stdout=subprocess.PIPE)
        comp = subprocess.Popen([xz, "-T0", f"-{preset}", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE)
        tar.stdout.close()
        while chunk := comp.stdout.read(1 << 20):
            writer.write(chunk)
        if comp.wait() or tar.wait():
            raise SystemExit("gpu-bundle: tar | xz failed")
    else:
        level = int(preset[0]) | (lzma.PRESET_EXTREME if preset.endswith("e") else 0)
        with lzma.open(writer, "wb", preset=level) as lz, tarfile.open(fileobj=lz, mode="w|") as tf:
            tf.add(str(site), arcname=".")
    writer.close()
    return writer.paths, time.perf_counter() - t0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def prepare(out: Path = OUT, python: str = DEVICE_PYTHON, preset: str = "9e", part_mib: float = PART_MIB,
            pins_file: Path = PINS, cache: Path | None = None) -> dict:
    """Download, lay out, trim, compress and cut the bundle into `out`; returns bundle.json."""
    pins = read_pins(pins_file)
    t0 = time.perf_counter()
    dl = cache or out / f"wheels-py{python}"
    wheels = download(pins, python, dl)
    wheels = [w for w in wheels if any(_dist_key(w.name.split("-")[0]) == _dist_key(p.split("==")[0]) and
                                       f"-{p.split('==')[1]}-" in w.name for p in pins)]
    for old in out.glob("part-*"):
        shutil.rmtree(old)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        site = Path(tmp) / "site"
        lay_out(wheels, site)
        laid = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
        dropped = trim(site, python)
        unpacked = laid - dropped
        files = sum(1 for f in site.rglob("*") if f.is_file())
        parts, comp_s = compress(site, out, preset, part_mib)
    info = {
        "python": python, "pins": pins, "wheels": [w.name for w in wheels],
        "wheel_mib": round(sum(w.stat().st_size for w in wheels) / MIB, 1),
        "unpacked_mib": round(unpacked / MIB, 1), "trimmed_mib": round(dropped / MIB, 1), "files": files,
        "preset": preset, "compress_s": round(comp_s, 1), "prepare_s": round(time.perf_counter() - t0, 1),
        "compressed_mib": round(sum(p.stat().st_size for p in parts) / MIB, 1),
        "parts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in parts],
    }
    for p in parts:  # each part folder says what the whole is: any one call can check it
        (p.parent / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------- the plan
def estimate(info: dict, budget_s: float, unpack_s: float | None = None) -> dict:
    """Device seconds for the plan: a start, one call per part but the last, and the last part
    carried with the check itself (unpack + the check's budget). Assumptions: START_S, CALL_S,
    CARRY_MIB_PER_S, UNPACK_MIB_PER_S (or the measured `unpack_s`)."""
    sizes = [p["bytes"] / MIB for p in info["parts"]]
    carry = [CALL_S + s / CARRY_MIB_PER_S for s in sizes[:-1]]
    unpack = unpack_s if unpack_s is not None else info["unpacked_mib"] / UNPACK_MIB_PER_S
    last = CALL_S + sizes[-1] / CARRY_MIB_PER_S + unpack + budget_s
    total = START_S + sum(carry) + last
    rerun = budget_s + CALL_S  # the rerun finds the tree unpacked (and the parts in /tmp/gw)
    return {"start_s": START_S, "carry_calls_s": [round(c, 1) for c in carry], "last_call_s": round(last, 1),
            "unpack_s": round(unpack, 1), "total_s": round(total, 1), "rerun_s": round(rerun, 1),
            "estimated_device_minutes": round(total / 60, 1),
            "fits": total <= FIT_S and total + rerun <= DEVICE_S,
            "assumptions": {"start_s": START_S, "call_s": CALL_S, "carry_mib_per_s": CARRY_MIB_PER_S,
                            "unpack_mib_per_s": UNPACK_MIB_PER_S if unpack_s is None else None}}


def tree_mib(root: Path = ROOT) -> float | None:
    """What every device call sends besides what it carries: the tracked files and the
    untracked ones git does not ignore (None outside a git checkout)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file()) / MIB


def load_info(out: Path = OUT) -> dict:
    found = sorted(out.glob("part-*/bundle.json"))
    if not found:
        raise SystemExit(f"gpu-bundle: no bundle in {out}: run `python -m tools.gpu_bundle prepare` first")
    return json.loads(found[0].read_text())


def plan(out: Path = OUT, budget_s: float = 300) -> list[str]:
    info = load_info(out)
    est = estimate(info, budget_s)
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    n = len(info["parts"])
    lines = [f"bundle: {len(info['pins'])} pins for Python {info['python']}, {info['unpacked_mib']:.0f} MiB "
             f"unpacked ({info['trimmed_mib']:.0f} MiB trimmed), {info['compressed_mib']:.1f} MiB as xz "
             f"-{info['preset']} in {n} part(s)",
             "Device calls, back to back (each within 30 s of the last, while the machine is warm):"]
    for i, p in enumerate(info["parts"][:-1]):
        lines.append(f"  call {i + 1}: carry [\"{rel}/part-{i}\"] ({p['bytes'] / MIB:.1f} MiB), timeout_s 60, "
                     f"command: mkdir -p /tmp/gw && cp {rel}/part-{i}/* /tmp/gw/  (~{est['carry_calls_s'][i]:.0f} s)")
    timeout = int(est["last_call_s"] - CALL_S + 60)
    lines.append(f"  call {n}: carry [\"{rel}/part-{n - 1}\"] ({info['parts'][-1]['bytes'] / MIB:.1f} MiB), "
                 f"timeout_s {timeout}, command: make gpu-check  (~{est['last_call_s']:.0f} s: unpack "
                 f"~{est['unpack_s']:.0f} s, then the check's {budget_s:.0f} s budget)")
    lines.append(f"Estimate: {est['estimated_device_minutes']:.1f} device minutes with the start "
                 f"(~{START_S:.0f} s); a rerun of call {n} ~{est['rerun_s'] / 60:.1f} min more: "
                 + ("fits" if est["fits"] else "DOES NOT FIT")
                 + f" ({FIT_S // 60} min, {DEVICE_S // 60} with the rerun)")
    tree = tree_mib()
    biggest = max(p["bytes"] for p in info["parts"]) / MIB + 0.01
    if tree is not None:
        lines.append(f"Each call also sends the working tree ({tree:.1f} MiB): the largest call is "
                     f"{biggest + tree:.1f} of {CALL_MIB} MiB" + ("" if biggest + tree <= CALL_MIB else
                                                                   ": TOO LARGE, prepare with a smaller --part-mib"))
    lines.append("If the machine went back between calls, /tmp/gw is gone: start again at call 1.")
    return lines


# ---------------------------------------------------------------- unpack (on the device)
class _Joined(io.RawIOBase):
    """The parts read back to back as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths, self._file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._file is None:
                if not self._paths:
                    return 0
                self._file = self._paths.pop(0).open("rb")
            n = self._file.readinto(buf)
            if n:
                return n
            self._file.close()
            self._file = None


def find_parts(dirs: list[Path]) -> tuple[dict | None, list[Path]]:
    """bundle.json and the part files found under `dirs` (each a folder of parts or of
    part-N folders), in order; (None, []) where there are none."""
    info, found = None, {}
    for d in dirs:
        for f in [*d.glob("bundle.json"), *d.glob("part-*/bundle.json")]:
            info = info or json.loads(f.read_text())
        for f in [*d.glob("bundle.tar.xz.*"), *d.glob("part-*/bundle.tar.xz.*")]:
            found.setdefault(f.name, f)
    if info is None:
        return None, []
    return info, [found[p["name"]] for p in info["parts"] if p["name"] in found]


def unpack(dirs: list[Path], site: Path) -> dict:
    """Check the parts against bundle.json and stream them into `site`. Does nothing (and says
    so) where `site` already holds this bundle. Raises with one line naming what is missing."""
    info, paths = find_parts(dirs)
    if info is None:
        raise FileNotFoundError(f"no bundle.json in {', '.join(map(str, dirs))}: carry the parts "
                                "(python -m tools.gpu_bundle plan)")
    stamp = site / ".bundle.json"
    want = [p["sha256"] for p in info["parts"]]
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == want:
        return {"unpacked": False, "site": str(site), "parts": len(want), "reason": "already unpacked"}
    if len(paths) != len(want):
        have = {p.name for p in paths}
        missing = [p["name"] for p in info["parts"] if p["name"] not in have]
        raise FileNotFoundError(f"bundle parts missing: {', '.join(missing)} (found {len(paths)} of {len(want)} in "
                                f"{', '.join(map(str, dirs))}): carry them (python -m tools.gpu_bundle plan)")
    t0 = time.perf_counter()
    for path, part in zip(paths, info["parts"]):
        if path.stat().st_size != part["bytes"] or sha256(path) != part["sha256"]:
            raise ValueError(f"{path}: not the part bundle.json names (size or sha256 differ): carry it again")
    checked = time.perf_counter() - t0
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    with lzma.open(io.BufferedReader(_Joined(paths), 1 << 20)) as lz, tarfile.open(fileobj=lz, mode="r|") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(site, filter="data")
        else:  # Python before 3.11.4
            tf.extractall(site)
    stamp.write_text(json.dumps({"sha256": want, "python": info["python"], "pins": info["pins"]}))
    return {"unpacked": True, "site": str(site), "parts": len(paths), "python": info["python"],
            "compressed_mib": info["compressed_mib"], "unpacked_mib": info["unpacked_mib"],
            "check_s": round(checked, 1), "unpack_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_bundle", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download, trim, compress and cut the bundle")
    pp.add_argument("--out", type=Path, default=OUT)
    pp.add_argument("--python", default=DEVICE_PYTHON, help="the device's Python, X.Y")
    pp.add_argument("--preset", default="9e", help="xz preset (9e: smallest; 6: faster, for rehearsals)")
    pp.add_argument("--part-mib", type=float, default=PART_MIB)
    pl = sub.add_parser("plan", help="the device calls, their sizes and the device minutes")
    pl.add_argument("--out", type=Path, default=OUT)
    pl.add_argument("--budget-s", type=float, default=300, help="the check's --budget-s")
    args = p.parse_args(argv)
    out = args.out.resolve()
    if args.cmd == "prepare":  # .gpu-wheels/ is in .gitignore: it travels only where a call carries it
        info = prepare(out, args.python, args.preset, args.part_mib)
        print(f"gpu-bundle: {info['wheel_mib']:.0f} MiB of wheels -> {info['unpacked_mib']:.0f} MiB unpacked "
              f"({info['trimmed_mib']:.0f} MiB trimmed) -> {info['compressed_mib']:.1f} MiB in "
              f"{len(info['parts'])} part(s) under {out} ({info['prepare_s']:.0f} s)")
    print("\n".join(plan(out, getattr(args, "budget_s", 300))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
