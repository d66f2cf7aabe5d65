"""`make gpu-check`'s script, run here on the CPU as CI can (`--smoke`: real DALI CPU, a real
corpus, tiny sizes): the JSON's structure and real figures, the log, the CUDA-only steps
skipped with their reason, and the isolation of steps (one hung until its limit, one dying
after its first figures: both recorded, those figures kept, the others complete); a machine
without DALI gets one line and a non-zero exit. And the carry plan (`tools.gpu_bundle`) on a
small bundle of a real wheel: laid out as pip would, trimmed, cut into parts, checked and
unpacked; the hardware-decoder verdict's rules. The rehearsal with
the real bundle (`make gpu-check-dry`) is in tests/e2e/test_gpu_check_dry.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import DEFAULT_BUDGET_S, SMOKE, STEPS, hardware_verdict, plan_timeouts, step_limit
from tools import gpu_bundle

ROOT = Path(__file__).resolve().parents[1]

# A sitecustomize that makes this interpreter look like the lent GPU machine: the modules in
# BLOCK do not import (tests/e2e/test_gpu_check_dry.py has the variant that lets the bundle in).
BLOCKER = '''
import os, sys
BLOCK = set(os.environ["GPU_CHECK_TEST_BLOCK"].split(","))

class Lent:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCK or name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU machine)", name=name)
        return None

sys.meta_path.insert(0, Lent())
'''


def run_check(out: Path, *args: str, env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def lent_machine_env(tmp: Path, block: list[str]) -> dict:
    site = tmp / "lent-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "GPU_CHECK_TEST_BLOCK": ",".join(block)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """One smoke run with `graphs` hung until a 4 s limit and `model` dying after its first
    figures. The other steps get four times the default budget: on a loaded 2-core machine
    their CPU forms can outlast the GPU's limits, and what is tested here is the isolation,
    not the speed (`make gpu-check-dry` runs within the default budget)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    proc = run_check(tmp / "out", "--smoke", "--work", str(tmp / "work"), "--fail", "graphs:hang", "--fail",
                     "model:late", "--step-budget", "graphs=4", "--budget-s", "1200", timeout=1500)
    report = json.loads((tmp / "out" / "gpu-check.json").read_text())
    return proc, report, tmp


def test_smoke_report_structure_and_isolation(smoke):
    proc, report, tmp = smoke
    assert proc.returncode == 1, proc.stdout[-3000:]  # steps failed on purpose: non-zero
    assert report["schema"] == 1 and report["mode"] == "smoke" and report["mode_reason"] == "--smoke"
    assert report["budget_s"] == 1200 and report["hardware_decoder"] is None and report["dry"] is False
    assert list(report["steps"]) == [s.name for s in STEPS]
    assert report["sizes"]["train_images"] == SMOKE.train_images and report["ok"] is False
    assert report["failed"] == ["graphs", "model"]
    steps = report["steps"]
    graphs = steps["graphs"]
    assert graphs["status"] == "timeout" and graphs["seconds"] >= 4 and "limit" in graphs["error"], graphs
    assert any("hanging on purpose" in line for line in graphs["tail"])
    model = steps["model"]
    assert model["status"] == "error" and "exited with code 3" in model["error"], model
    assert any("dying on purpose after a partial report" in line for line in model["tail"])
    # what it measured before it was cut off is kept: one round of the four configurations
    assert model["partial"]["rounds"] == 1 and len(model["partial"]["images_per_s"]) == 4
    assert all(v[0] > 0 for v in model["partial"]["images_per_s"].values())
    for name in ("machine", "corpus", "auto", "e2e", "rebuild", "pytest"):
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert steps[name]["seconds"] > 0
    assert steps["decoder"]["status"] == "skipped" and "needs CUDA" in steps["decoder"]["reason"]


def test_smoke_figures_are_measured(smoke):
    _, report, tmp = smoke
    s = report["steps"]
    machine = s["machine"]["result"]
    assert machine["cuda"] is False and machine["cores"] >= 1 and machine["dali"]
    corpus = s["corpus"]["result"]
    assert corpus["train_images"] == SMOKE.train_images and corpus["val_images"] == SMOKE.val_images
    assert corpus["described"]["256"]["images"] == SMOKE.train_images and corpus["tars"]["256"] >= 2
    assert sorted(p.name for p in Path(corpus["shards_256"]).glob("*/*.tar"))
    assert {p.name for p in Path(corpus["shards_256"]).iterdir()} >= {"train", "val", "stats.json", "manifest.parquet"}

    auto = s["auto"]["result"]
    assert isinstance(auto["num_threads"], int) and auto["num_threads"] >= 1
    assert auto["tuning"]["probes"] and auto["images_per_s"]["median"] > 0

    e2e = s["e2e"]["result"]
    assert e2e["images_per_s"] > 0 and e2e["steps"] == SMOKE.e2e_steps
    assert e2e["steps_sized"]["from"].startswith("default")  # the model step was cut off: no rate to size from
    assert 0 <= e2e["data_wait_share"]["overall"] <= 1 and e2e["final_loss"] > 0
    assert "max_memory_allocated_mib" not in e2e  # CPU: no device memory to report

    rebuild = s["rebuild"]["result"]
    assert [e["epoch"] for e in rebuild["epochs"]] == list(range(1, 11))
    assert all(e["first_batch_s"] > 0 and e["epoch_s"] >= e["first_batch_s"] and e["batches"] == 2
               for e in rebuild["epochs"])
    assert rebuild["memory"] == "rss_mib" and rebuild["memory_epoch_2_mib"] > 0
    assert 0 <= rebuild["share_of_epoch"] < 1 and rebuild["steady_images_per_s"] > 0

    tests = s["pytest"]["result"]
    assert tests["rc"] == 0 and tests["counts"].get("skipped", 0) >= 8 and not tests["collection_errors"]
    assert "tests/test_pipeline_gpu.py" in tests["files"]


def test_smoke_log_and_table(smoke):
    proc, report, tmp = smoke
    log = (tmp / "out" / "gpu-check.log").read_text()
    stamped = re.compile(r"^\d\d:\d\d:\d\d \+ *\d+\.\ds ")
    assert log.splitlines() and all(stamped.match(line) for line in log.splitlines())
    for step in STEPS:
        assert f"== {step.name}:" in log
    assert "hanging on purpose (--fail graphs:hang)" in log and "[rebuild]   epoch 10:" in log
    table = proc.stdout[proc.stdout.rindex("step      status"):]
    assert re.search(r"e2e +ok +\d+\.\d  \d+ images/s, data wait", table), table
    assert re.search(r"decoder +skipped", table)


def test_without_cuda_the_run_is_the_smoke_run_and_steps_skip_without_the_corpus(tmp_path):
    proc = run_check(tmp_path / "out", "--work", str(tmp_path / "work"), "--fail", "corpus", "--fail", "model",
                     "--fail", "pytest", "--budget-s", "1200", timeout=1500)
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert proc.returncode == 1
    assert report["mode"] == "smoke" and report["mode_reason"] == "torch sees no CUDA GPU"
    assert report["failed"] == ["corpus", "model", "pytest"]
    for name in ("auto", "graphs", "e2e", "rebuild"):
        assert report["steps"][name] == {"status": "skipped",
                                         "reason": "needs the corpus, which the corpus step did not make"}


def test_without_dali_one_line_and_non_zero(tmp_path):
    env = lent_machine_env(tmp_path, ["nvidia.dali"])
    proc = run_check(tmp_path / "out", "--smoke", env=env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert report["ok"] is False and report["steps"] == {}
    assert report["error"].startswith("nvidia.dali does not import") and "gpu_bundle plan" in report["error"]
    assert "\n" not in report["error"]


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A wheel as pip writes one: a zip of the files and a dist-info."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return path


def test_bundle_lays_out_trims_cuts_checks_and_unpacks(tmp_path):
    """The carry plan's mechanics on a small bundle: the tree is what pip --target lays out,
    less what no import reads; cut into parts of at most the part size; each call can check
    its part; a changed or missing part is named in one line; a second unpack is a no-op."""
    noise = os.urandom(300_000)  # does not compress: three parts of 0.1 MiB
    wheel = make_wheel(tmp_path, "demo_pkg", "1.0", {
        "demo_pkg/__init__.py": b"VALUE = 42\n",
        "demo_pkg/blob.bin": noise,
        "demo_pkg/_ext.cpython-312-x86_64-linux-gnu.so": b"for the device's Python",
        "demo_pkg/_ext.cpython-313-x86_64-linux-gnu.so": b"for another Python",
        "demo_pkg/include/demo.h": b"/* headers */",
        "demo_pkg-1.0.data/purelib/demo_extra.py": b"EXTRA = 1\n",
        "demo_pkg-1.0.data/scripts/demo-tool": b"#!/bin/sh\n",
    })
    site = tmp_path / "laid"
    gpu_bundle.lay_out([wheel], site)
    assert (site / "demo_extra.py").is_file() and not (site / "demo-tool").exists()
    gpu_bundle.DROP_DIRS += ("demo_pkg/include",)
    try:
        dropped = gpu_bundle.trim(site, "3.12")
    finally:
        gpu_bundle.DROP_DIRS = gpu_bundle.DROP_DIRS[:-1]
    assert dropped == len(b"for another Python") + len(b"/* headers */")
    kept = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert kept == ["demo_extra.py", "demo_pkg-1.0.dist-info/METADATA", "demo_pkg/__init__.py",
                    "demo_pkg/_ext.cpython-312-x86_64-linux-gnu.so", "demo_pkg/blob.bin"]

    out = tmp_path / "bundle"
    parts, _ = gpu_bundle.compress(site, out, "6", part_mib=0.1)
    assert len(parts) == 3 and all(p.stat().st_size <= 0.1 * 2 ** 20 for p in parts)
    assert [p.parent.name for p in parts] == ["part-0", "part-1", "part-2"]
    info = {"python": "3.12", "pins": ["demo_pkg==1.0"], "unpacked_mib": 0.3, "compressed_mib": 0.3,
            "parts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": gpu_bundle.sha256(p)} for p in parts]}
    for p in parts:
        (p.parent / "bundle.json").write_text(json.dumps(info))

    # the device: the first parts were copied to /tmp/gw by earlier calls, the last came with this one
    gw = tmp_path / "gw"
    gw.mkdir()
    for p in parts[:2]:
        (gw / p.name).write_bytes(p.read_bytes())
    carried = tmp_path / "tree" / ".gpu-wheels" / "part-2"
    carried.mkdir(parents=True)
    for f in parts[2].parent.iterdir():
        (carried / f.name).write_bytes(f.read_bytes())
    dest = tmp_path / "site"
    got = gpu_bundle.unpack([gw, carried.parent], dest)
    assert got["unpacked"] and got["parts"] == 3
    assert (dest / "demo_pkg" / "blob.bin").read_bytes() == noise
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(kept + [".bundle.json"])
    assert gpu_bundle.unpack([gw, carried.parent], dest)["unpacked"] is False  # a rerun finds it unpacked

    (gw / parts[1].name).write_bytes(b"x" + (gw / parts[1].name).read_bytes()[1:])
    with pytest.raises(ValueError, match=rf"{parts[1].name}: not the part bundle.json names .*carry it again"):
        gpu_bundle.unpack([gw, carried.parent], tmp_path / "site2")
    (gw / parts[0].name).unlink()
    with pytest.raises(FileNotFoundError, match=r"bundle parts missing: bundle.tar.xz.0 \(found 2 of 3"):
        gpu_bundle.unpack([gw, carried.parent], tmp_path / "site2")


def test_plan_estimates_the_device_minutes_and_says_whether_they_fit(tmp_path):
    part = {"name": "bundle.tar.xz.0", "bytes": 60 * 2 ** 20, "sha256": "-"}
    info = {"python": "3.12", "pins": ["a==1"], "unpacked_mib": 480.0, "trimmed_mib": 96.0, "compressed_mib": 180.0,
            "preset": "9e", "parts": [dict(part, name=f"bundle.tar.xz.{i}") for i in range(3)]}
    est = gpu_bundle.estimate(info, budget_s=300)
    per_carry = gpu_bundle.CALL_S + 60 / gpu_bundle.CARRY_MIB_PER_S
    assert est["carry_calls_s"] == [per_carry, per_carry]  # the third part travels with the check itself
    assert est["total_s"] == pytest.approx(gpu_bundle.START_S + 3 * per_carry + 480 / gpu_bundle.UNPACK_MIB_PER_S
                                           + 300, abs=0.1)
    assert est["fits"] and est["total_s"] <= 600 and est["total_s"] + est["rerun_s"] <= 900
    too_many = dict(info, parts=[dict(part, name=f"bundle.tar.xz.{i}") for i in range(7)])
    assert not gpu_bundle.estimate(too_many, budget_s=300)["fits"]
    (tmp_path / "part-0").mkdir()
    (tmp_path / "part-0" / "bundle.json").write_text(json.dumps(info))
    lines = gpu_bundle.plan(tmp_path, budget_s=300)
    assert sum(ln.strip().startswith("call ") for ln in lines) == 3 and "make gpu-check" in lines[-4]
    assert lines[-3].startswith(f"Estimate: {est['estimated_device_minutes']:.1f} device minutes")
    assert "fits" in lines[-3]
    tree = gpu_bundle.tree_mib()
    assert 0.5 < tree < 4  # this checkout's files, without .venv, data/ or .gpu-wheels/
    assert lines[-2].startswith(f"Each call also sends the working tree ({tree:.1f} MiB)") and "TOO" not in lines[-2]


def test_the_bundle_pins_are_exact_and_agree_with_the_project():
    """What the device runs is what `make setup` installs, version for version, except the
    DALI build: the CUDA 13 pin set (pyproject's `cuda13` extra)."""
    import tomllib

    pins = dict(p.split("==") for p in gpu_bundle.read_pins())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = dict(d.split("==") for d in project["dependencies"] + project["optional-dependencies"]["cuda13"]
                    if "==" in d and ";" not in d)
    declared = {k.split("[")[0]: v.split(" ")[0] for k, v in declared.items()}
    shared = set(pins) & set(declared)
    assert {"nvidia-dali-cuda130", "nvidia-nvjpeg", "webdataset", "pydantic"} <= shared
    assert {k: pins[k] for k in shared} == {k: declared[k] for k in shared}
    assert pins["nvidia-dali-cuda130"] == declared.get("nvidia-dali-cuda120", pins["nvidia-dali-cuda130"])


def test_steps_share_the_budget_and_pass_on_what_they_leave():
    assert sum(s.budget_s for s in STEPS) <= DEFAULT_BUDGET_S == 300
    planned = plan_timeouts(300, {})
    by = {s.name: s for s in STEPS}
    gpu = list(STEPS)
    assert step_limit(by["machine"], 300, planned, {}, gpu) == pytest.approx(300 * 15 / 295)
    # on the CPU the CUDA steps are skipped: their shares, and the time earlier steps left, go to the rest
    cpu_rest = [by[n] for n in ("model", "rebuild", "e2e", "pytest")]
    assert step_limit(by["model"], 270, planned, {}, cpu_rest) == pytest.approx(270 * 15 / 125)
    # a --step-budget is as given (at most what is left), and the others share the rest
    assert step_limit(by["model"], 270, planned, {"model": 4}, cpu_rest) == 4
    assert step_limit(by["e2e"], 270, planned, {"pytest": 100}, cpu_rest[2:]) == pytest.approx(170.0)
    assert step_limit(by["pytest"], 3, planned, {"pytest": 100}, cpu_rest[3:]) == 3


@pytest.mark.parametrize("case,verdict", [
    ("engine busy, faster at 1.0", "used"),
    ("engine busy, same rate", "used"),  # NVML is the direct evidence; the equal rates are noted
    ("NVML reads 0 at 1.0", "not used"),
    ("no NVML, same rate within noise", "not used"),
    ("no NVML, faster at 1.0", "used"),
    ("backend not loaded", "not used"),
])
def test_hardware_decoder_verdict(case, verdict):
    def rate(lo, med, hi):
        return {"min": lo, "median": med, "max": hi}

    util = {"0": {"mean": 0.0, "max": 0.0, "samples": 20}, "1": {"mean": 0.6, "max": 0.9, "samples": 20}}
    args = dict(capabilities="compute,utility,video", hw_backend={"ok": True}, util=util,
                rate_0=rate(4000, 4100, 4200), rate_1=rate(6900, 7000, 7100))
    if case == "NVML reads 0 at 1.0":
        args["util"] = {**util, "1": {"mean": 0.0, "max": 0.0, "samples": 20}}
    if "same rate" in case:
        args["rate_1"] = rate(4150, 4250, 4350)
    if case.startswith("no NVML"):
        args["util"] = {"0": None, "1": None}
    if case == "backend not loaded":
        args["hw_backend"] = {"ok": False, "reason": "the hardware backend decoded nothing"}
        args["capabilities"] = "compute,utility"
    got = hardware_verdict(**args)
    assert got["verdict"] == verdict, got
    assert (got["why"] is None) == (verdict == "used")
    assert ("same rate" in " ".join(got["notes"])) == (case == "engine busy, same rate")
    if case == "backend not loaded":
        assert "lacks video" in got["why"] and "decoded nothing" in got["why"]


def test_the_check_and_its_wheel_tools_load_on_a_bare_machine(tmp_path):
    """bench/gpu_check.py and tools/gpu_bundle.py run before anything is installed: their
    module tops import nothing beyond the standard library (torch is there, but not needed)."""
    block = ["ray", "moto", "webdataset", "tqdm", "braceexpand", "nvidia", "numpy", "PIL", "pyarrow", "torch",
             "matplotlib", "yaml", "pipeline", "shards", "model", "orchestration"]
    env = {**os.environ, **lent_machine_env(tmp_path, block)}
    proc = subprocess.run([sys.executable, "-c", "import bench.gpu_check, tools.gpu_bundle; "
                           "bench.gpu_check.parse_args(['--smoke'])"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
