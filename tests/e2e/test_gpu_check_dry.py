"""`make gpu-check-dry`: the GPU check rehearsed on this CPU machine with the real bundle.

The bundle's pins (tools/gpu-bundle.txt: DALI's cuda130 build, its CUDA 13 nvJPEG, pydantic,
webdataset, ...) for this Python, prepared once per machine (about 250 MB from the registry
and a few minutes of xz the first time, cached under ~/.cache/alexnet-dali/gpu-bundle/),
unpacked into a scratch site that comes first on PYTHONPATH; then every step in its CPU form
within the default budget. Only the CUDA calls are left untested. And the GPU test files
collect with nothing but the bundle beside the device image's packages."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import gpu_bundle

ROOT = Path(__file__).resolve().parents[2]
GPU_TEST_FILES = ["tests/test_pipeline_gpu.py", "tests/test_pipeline_dali.py", "tests/test_orchestration_hot_path.py"]

# Makes this interpreter look like the lent machine's: what its image lacks (KINDS) imports only
# from the folder GPU_CHECK_TEST_SITE (the unpacked bundle); ray, moto, boto3 and promql_parser not at all.
BLOCKER = '''
import importlib.machinery, os, sys
BLOCK = set(os.environ["GPU_CHECK_TEST_BLOCK"].split(","))
SITE = os.environ["GPU_CHECK_TEST_SITE"]
NEVER = {"ray", "moto", "boto3", "promql_parser"}

class Lent:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCK:
            spec = None if top in NEVER else importlib.machinery.PathFinder.find_spec(
                name, path if "." in name else [SITE])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU machine)", name=name)
            return spec
        return None

sys.meta_path.insert(0, Lent())
'''
LACKING = ["nvidia", "webdataset", "braceexpand", "pydantic", "pydantic_core", "annotated_types",
           "typing_inspection", "ray", "moto", "boto3", "promql_parser"]


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu-check-dry")
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check-dry"], cwd=ROOT,
                          env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=1800)
    return proc, json.loads((out / "gpu-check.json").read_text())


def test_the_rehearsal_runs_every_step_from_the_unpacked_bundle(dry):
    proc, report = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report["mode"] == "dry" and report["dry"] is True and report["ok"] is True
    install = report["install"]
    assert install["unpacked"] and install["scratch"] and install["parts"] >= 1
    assert not Path(install["site"]).exists(), "the scratch site is removed at the end"
    machine = report["steps"]["machine"]["result"]
    assert machine["dali_from"].startswith(install["site"])  # not .venv's cuda120 build
    assert machine["versions"]["nvidia-dali-cuda130"] == "2.4.0"
    pins = dict(p.split("==") for p in gpu_bundle.read_pins())
    assert machine["versions"]["nvidia-nvjpeg"] == pins["nvidia-nvjpeg"]
    for name, entry in report["steps"].items():
        if name in ("decoder", "peers"):
            assert entry["status"] == "skipped" and "needs CUDA" in entry["reason"]
        else:
            assert entry["status"] == "ok", (name, entry)
    assert report["steps"]["pytest"]["result"]["collection_errors"] == []


def test_the_rehearsal_reports_the_plan_for_the_device(dry):
    _, report = dry
    assert report["hardware_decoder"] is None  # no GPU: nothing to prove or disprove
    assert isinstance(report["bundle_parts"], int) and report["bundle_parts"] >= 1
    plan = report["device_plan"]
    assert report["estimated_device_minutes"] == plan["estimated_device_minutes"] > 0
    assert plan["unpack_s"] == report["install"]["unpack_s"]  # measured here, not assumed
    assert plan["total_s"] == pytest.approx(plan["start_s"] + sum(plan["carry_calls_s"]) + plan["last_call_s"], abs=0.5)
    assert len(plan["carry_calls_s"]) == report["bundle_parts"] - 1
    assert report["wall_s"] <= report["budget_s"] + 60  # the steps' limits hold (the budget is the limit's sum)


def test_gpu_test_files_collect_with_only_the_bundle(tmp_path, dry):
    """The device image lacks ray, moto, pydantic, webdataset and DALI: with the unpacked
    bundle (and nothing else) on the path, every gpu test file collects."""
    bundle = Path(dry[1]["install"]["bundle"])
    site = tmp_path / "site"
    gpu_bundle.unpack([bundle], site)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCKER)
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               *GPU_TEST_FILES]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
           "GPU_CHECK_TEST_BLOCK": ",".join(LACKING), "GPU_CHECK_TEST_SITE": str(tmp_path / "empty")}
    bare = subprocess.run(collect, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "blocked: not on the GPU machine" in bare.stdout + bare.stderr, "the blocker bites"
    env["GPU_CHECK_TEST_SITE"] = str(site)
    ok = subprocess.run(collect, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    collected = re.search(r"(\d+)/\d+ tests collected", ok.stdout) or re.search(r"(\d+) tests? collected", ok.stdout)
    assert collected and int(collected.group(1)) >= 10, ok.stdout[-1500:]
