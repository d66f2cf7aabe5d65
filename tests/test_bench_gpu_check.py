"""`make gpu-check`'s script, run here on the CPU as CI can (`--smoke`: real DALI CPU, a real
corpus, tiny sizes): the JSON's structure and real figures, the log, the CUDA-only steps
skipped with their reason, and the isolation of steps (one broken on purpose, one hung
until its limit: both recorded, the others complete). And what the GPU machine lacks: the
gpu test files still collect there without ray, moto, webdataset or tqdm once the carried
extras are on the path, and a machine without DALI gets one line and a non-zero exit."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import SMOKE, STEPS

ROOT = Path(__file__).resolve().parents[1]
GPU_TEST_FILES = ["tests/test_pipeline_gpu.py", "tests/test_pipeline_dali.py", "tests/test_orchestration_hot_path.py"]

# A sitecustomize that makes this interpreter look like the lent GPU machine: the modules in
# BLOCK do not import, except from the folder named by GPU_CHECK_TEST_EXTRAS (the carried extras).
BLOCKER = '''
import importlib.machinery, os, sys
BLOCK = set(os.environ["GPU_CHECK_TEST_BLOCK"].split(","))
EXTRAS = os.environ.get("GPU_CHECK_TEST_EXTRAS")

class Lent:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCK or name.split(".")[0] in BLOCK:
            spec = (importlib.machinery.PathFinder.find_spec(name, path if "." in name else [EXTRAS])
                    if EXTRAS and name.split(".")[0] not in ("ray", "moto", "nvidia") else None)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU machine)", name=name)
            return spec
        return None

sys.meta_path.insert(0, Lent())
'''


def run_check(out: Path, *args: str, env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def lent_machine_env(tmp: Path, block: list[str], extras: Path | None = None) -> dict:
    site = tmp / "lent-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "GPU_CHECK_TEST_BLOCK": ",".join(block)}
    if extras is not None:
        env["GPU_CHECK_TEST_EXTRAS"] = str(extras)
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """One smoke run with `graphs` broken on purpose and `model` hung until a 4 s limit."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    proc = run_check(tmp / "out", "--smoke", "--work", str(tmp / "work"), "--fail", "graphs", "--fail",
                     "model:hang", "--step-budget", "model=4")
    report = json.loads((tmp / "out" / "gpu-check.json").read_text())
    return proc, report, tmp


def test_smoke_report_structure_and_isolation(smoke):
    proc, report, tmp = smoke
    assert proc.returncode == 1, proc.stdout[-3000:]  # steps failed on purpose: non-zero
    assert report["schema"] == 1 and report["mode"] == "smoke" and report["mode_reason"] == "--smoke"
    assert list(report["steps"]) == [s.name for s in STEPS]
    assert report["sizes"]["train_images"] == SMOKE.train_images and report["ok"] is False
    assert report["failed"] == ["graphs", "model"]
    steps = report["steps"]
    assert steps["graphs"]["status"] == "error" and "forced failure (--fail graphs)" in steps["graphs"]["error"]
    model = steps["model"]
    assert model["status"] == "timeout" and 4 <= model["seconds"] < 15 and "limit" in model["error"], model
    assert any("hanging on purpose" in line for line in model["tail"])
    for name in ("machine", "corpus", "auto", "e2e", "rebuild", "pytest"):
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert steps[name]["seconds"] > 0
    assert steps["decoder"]["status"] == "skipped" and "needs CUDA" in steps["decoder"]["reason"]
    assert report["wall_s"] < 120


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
    assert "forced failure (--fail graphs)" in log and "[rebuild]   epoch 10:" in log
    table = proc.stdout[proc.stdout.rindex("step      status"):]
    assert re.search(r"e2e +ok +\d+\.\d  \d+ images/s, data wait", table), table
    assert re.search(r"decoder +skipped", table)


def test_without_cuda_the_run_is_the_smoke_run_and_steps_skip_without_the_corpus(tmp_path):
    proc = run_check(tmp_path / "out", "--work", str(tmp_path / "work"), "--fail", "corpus", "--fail", "model",
                     "--fail", "pytest")
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
    assert report["error"].startswith("nvidia.dali does not import") and "gpu-wheels plan" in report["error"]
    assert "\n" not in report["error"]


def test_gpu_tests_collect_on_the_lent_machine_with_the_extras(tmp_path):
    """The GPU machine has no ray, moto, webdataset or tqdm: without the carried extras the
    test suite cannot even load its conftest (the packer imports tqdm); with them, every
    gpu test file collects."""
    block = ["ray", "moto", "webdataset", "tqdm", "braceexpand", "boto3", "promql_parser"]
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               *GPU_TEST_FILES]
    bare = subprocess.run(collect, cwd=ROOT, env={**os.environ, **lent_machine_env(tmp_path, block)},
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "tqdm" in bare.stdout + bare.stderr, "the blocker must bite"

    extras = tmp_path / "extras"
    bundled = run_check(tmp_path / "unused", "--bundle-extras", str(extras), timeout=60)
    assert bundled.returncode == 0 and {p.name for p in extras.iterdir()} >= {"webdataset", "tqdm", "braceexpand"}
    ok = subprocess.run(collect, cwd=ROOT, env={**os.environ, **lent_machine_env(tmp_path, block, extras)},
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    collected = re.search(r"(\d+)/\d+ tests collected", ok.stdout) or re.search(r"(\d+) tests? collected", ok.stdout)
    assert collected and int(collected.group(1)) >= 10, ok.stdout[-1500:]


def test_the_check_and_its_wheel_tools_load_on_a_bare_machine(tmp_path):
    """bench/gpu_check.py and tools/gpu_wheels.py run before anything is installed: their
    module tops import nothing beyond the standard library (torch is there, but not needed)."""
    block = ["ray", "moto", "webdataset", "tqdm", "braceexpand", "nvidia", "numpy", "PIL", "pyarrow", "torch",
             "matplotlib", "yaml", "pipeline", "shards", "model", "orchestration"]
    env = {**os.environ, **lent_machine_env(tmp_path, block)}
    proc = subprocess.run([sys.executable, "-c", "import bench.gpu_check, tools.gpu_wheels; "
                           "bench.gpu_check.parse_args(['--smoke'])"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
