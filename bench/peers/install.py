"""The peers' side environments: pinned, installed by the bench itself, never into `.venv`.

LitData declares torchvision (and with it a torch of pip's choosing), and torchvision does not
import beside the project's torch, so nothing here lets pip resolve: each peer's wheels go with
`pip install --no-deps --target` into a folder under `~/.cache/alexnet-dali/peers/` (named by
the Python version and the pins), and its loader runs in a child process with that folder on
`PYTHONPATH` after the repository, so it imports `.venv`'s torch, numpy and Pillow. pillow-simd
(an sdist: built here, with AVX2 where the CPU has it, as its README says) gets a folder of its
own, put *before* `.venv`'s site-packages in its child, where it stands in for Pillow. Each
result says in one line how the peer was installed, or why it is not measured.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = Path.home() / ".cache" / "alexnet-dali" / "peers"

# The wheels of each peer, pinned; their other requirements (torch, numpy, boto3, requests,
# filelock, urllib3) are the ones `.venv` already has. torchvision is left out on purpose.
PINS: dict[str, tuple[str, ...]] = {
    "spdl": ("spdl==0.8.0", "spdl_io==0.8.0", "spdl_core==0.8.0"),
    "litdata": ("litdata==0.2.76", "lightning-utilities==0.15.3", "tifffile==2026.3.3", "obstore==0.12.1"),
    "torch-pillow-simd": ("pillow-simd==12.1.1.post0",),
}
DIST = {"spdl": "spdl", "litdata": "litdata", "torch-pillow-simd": "pillow-simd"}
# What each peer must do in its environment before it counts as installed.
PROBES = {
    "spdl": "import io, numpy, spdl.io, spdl.pipeline\nfrom PIL import Image\nb = io.BytesIO()\n"
            "Image.fromarray(numpy.zeros((8, 8, 3), numpy.uint8)).save(b, 'JPEG')\n"
            "spdl.io.decode_packets(spdl.io.demux_image(b.getvalue()))",
    "litdata": "import litdata, litdata.streaming",
    "torch-pillow-simd": "import os, PIL, torch, webdataset\n"
                         "assert PIL.__file__.startswith(os.environ['PEER_SITE']), f'PIL from {PIL.__file__}'",
}
HINTS = {
    "spdl": "spdl_io loads FFmpeg's shared libraries (4 to 7) at run time: on Debian/Ubuntu "
            "`apt-get install libavformat59 libavfilter8 libavdevice59` (FFmpeg 5.1)",
}


@dataclass(frozen=True)
class PeerEnv:
    """Where a peer's loader imports it from, and how it got there."""

    name: str
    site: Path | None  # the folder its child puts on PYTHONPATH (None: not installed)
    first: bool  # the folder goes before the repository and .venv (pillow-simd replaces PIL)
    version: str | None
    method: str  # one line: how it was installed
    error: str | None = None  # why it is not measured (None: it is)

    @property
    def ok(self) -> bool:
        return self.error is None

    def pythonpath(self) -> str:
        """PYTHONPATH for the peer's child process."""
        if self.site is None:
            return str(ROOT)
        return os.pathsep.join([str(self.site), str(ROOT)] if self.first else [str(ROOT), str(self.site)])


def site_dir(base: Path, group: str, pins: tuple[str, ...]) -> Path:
    """A folder per Python version and set of pins: a new pin installs beside the old one."""
    tag = hashlib.sha256("\n".join(pins).encode()).hexdigest()[:10]
    return Path(base) / f"{group}-py{sys.version_info.major}{sys.version_info.minor}-{tag}"


def pip_target(site: Path, pins: tuple[str, ...], env: dict | None = None, timeout: float = 900) -> str | None:
    """`pip install --no-deps --target site pins` (once: a marker file says it is done);
    None when installed, else the reason in one line."""
    done = site / ".installed"
    if done.is_file():
        return None
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--upgrade", "--target", str(site), *pins]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return f"pip install {' '.join(pins)} ran past {timeout:.0f} s"
    if proc.returncode != 0:
        return f"pip install {' '.join(pins)} failed: {last_line(proc.stderr + proc.stdout)}"
    done.write_text(" ".join(pins) + "\n")
    return None


def last_line(text: str) -> str:
    """The most telling line of a tool's output: the last error line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "is ignored" not in ln]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.lower().startswith("note")]
    return (errors or lines or ["(no output)"])[-1][:300]


def probe(env: PeerEnv) -> str | None:
    """Run the peer's probe in a child with its PYTHONPATH; None when it passes."""
    proc = subprocess.run([sys.executable, "-c", PROBES[env.name]], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": env.pythonpath(), "PEER_SITE": str(env.site)}, cwd=ROOT)
    if proc.returncode == 0:
        return None
    hint = HINTS.get(env.name)
    return last_line(proc.stderr) + (f"; {hint}" if hint else "")


def version_in(site: Path, dist: str) -> str | None:
    for d in metadata.distributions(path=[str(site)]):
        if d.metadata["Name"].lower().replace("_", "-") == dist:
            return d.version
    return None


def simd_env() -> dict:
    """pillow-simd's documented build: AVX2 where the CPU has it (SSE4 otherwise)."""
    cpuinfo = Path("/proc/cpuinfo")
    avx2 = cpuinfo.is_file() and " avx2" in cpuinfo.read_text()
    return {"CC": "cc -mavx2"} if avx2 else {}


def ensure_peer(name: str, base: Path = DEFAULT_DIR) -> PeerEnv:
    """Install (once) and probe one peer."""
    pins = PINS[name]
    first = name == "torch-pillow-simd"
    build_env = simd_env() if first else {}
    site = site_dir(base, "simd" if first else name, pins)
    how = (f"pip install --no-deps --target {site} {' '.join(pins)}"
           + (f" (built from the sdist, CC='{build_env['CC']}')" if build_env else " (built from the sdist)"
              if first else "")
           + ("; put before .venv's site-packages in its child (replaces Pillow there)" if first
              else "; on its child's PYTHONPATH after the repository (.venv's torch, numpy, Pillow)"))
    error = pip_target(site, pins, build_env)
    if error:
        return PeerEnv(name, None, first, None, how, error)
    env = PeerEnv(name, site, first, version_in(site, DIST[name]), how)
    error = probe(env)
    return env if error is None else PeerEnv(name, site, first, env.version, how, error)


def ensure_peers(names: list[str], base: Path = DEFAULT_DIR, progress=print) -> dict[str, PeerEnv]:
    out = {}
    for name in names:
        progress(f"peers: installing {name} into {base} (once; cached)")
        out[name] = ensure_peer(name, base)
        if not out[name].ok:
            progress(f"peers: {name} is not measured: {out[name].error}")
    return out
