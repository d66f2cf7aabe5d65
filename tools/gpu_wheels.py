"""DALI and the project's few pure-Python needs on a lent GPU machine (CUDA torch, no DALI, no
registry), for `make gpu-check` (`bench/gpu_check.py`). Standard library only: it runs
before anything it installs is importable.

DALI comes as wheel parts carried there beforehand (`../shared/tools/gpu-wheels plan`, put in
/tmp/gw): `prepare_imports` reassembles them, pip-installs them (no index, no deps) into
/tmp/site and runs the calling module again with /tmp/site on PYTHONPATH. The pure-Python
packages the machine lacks (webdataset, braceexpand, tqdm; pynvml for the NVJPG figure) travel as `.gpu-wheels/extras`
(`bundle_extras`, here), put on PYTHONPATH the same way.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path("/tmp/gw")
SITE = Path("/tmp/site")
EXTRAS = ROOT / ".gpu-wheels" / "extras"
EXTRA_MODULES = ("webdataset", "braceexpand", "tqdm", "pynvml")  # pure Python; the lent machine lacks them
REEXEC_ENV = "GPU_CHECK_REEXEC"  # set on the re-run after installing: what the install did
MIB = 2 ** 20


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and its message, at most 400 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:400]}"


def dali_missing() -> str | None:
    """None where `nvidia.dali` imports; otherwise why not and what to do, in one line."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        return (f"nvidia.dali does not import ({one_line(err)}); carry the wheel parts to {WHEELS} "
                "(../shared/tools/gpu-wheels plan) and run again")
    return None


def install_info() -> dict:
    """What `prepare_imports` did before this run (empty when it did nothing)."""
    return json.loads(os.environ.get(REEXEC_ENV) or "{}")


def prepare_imports(module: str, argv: list[str]) -> None:
    """Install DALI from the carried wheel parts where it does not import, put it and the
    carried extras on PYTHONPATH, and run `python -m module *argv` again with them (once).
    Returns where nothing is missing or nothing can be added."""
    if os.environ.get(REEXEC_ENV):
        return
    paths, info = [], {}
    if EXTRAS.is_dir() and _missing(EXTRA_MODULES):
        paths.append(str(EXTRAS))
        info["extras"] = str(EXTRAS)
    if dali_missing():
        chunks = sorted(WHEELS.glob("chunk.*"))
        if not (SITE / "nvidia" / "dali").is_dir() and chunks:
            info.update(install_wheels(chunks))
        if (SITE / "nvidia" / "dali").is_dir():
            paths.insert(0, str(SITE))
    if not paths:
        return
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT), *old]), REEXEC_ENV: json.dumps(info)}
    print(f"gpu-check: running again with {', '.join(paths)} on PYTHONPATH", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def _missing(modules: tuple[str, ...]) -> bool:
    return any(importlib.util.find_spec(m) is None for m in modules)


def install_wheels(chunks: list[Path]) -> dict:
    """Reassemble the wheel bundle from its parts and pip-install it (no index, no deps) into SITE."""
    t0 = time.perf_counter()
    print(f"gpu-check: reassembling {len(chunks)} wheel part(s) in {WHEELS} and installing into {SITE}", flush=True)
    with subprocess.Popen(["cat", *map(str, chunks)], stdout=subprocess.PIPE) as cat:
        subprocess.run(["tar", "x", "-C", str(WHEELS)], stdin=cat.stdout, check=True)
    wheels = sorted(WHEELS.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE),
                    *map(str, wheels)], check=True)
    return {"install_s": round(time.perf_counter() - t0, 1), "wheels": [w.name for w in wheels]}


def bundle_extras(dest: Path = EXTRAS) -> int:
    """Copy the pure-Python packages the lent machine lacks (EXTRA_MODULES) from this
    interpreter into `dest` (`.gpu-wheels/extras`), to carry with the device call."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in EXTRA_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise SystemExit(f"gpu-check: {name} does not import here: run `make setup` first")
        src = Path(spec.origin)
        if src.name == "__init__.py":
            shutil.copytree(src.parent, dest / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / src.name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"gpu-check: {', '.join(EXTRA_MODULES)} in {dest} ({size / MIB:.1f} MiB): carry it to the GPU machine")
    return 0
