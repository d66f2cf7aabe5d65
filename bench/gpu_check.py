"""`make gpu-check`: the GPU tests and the GPU benchmark, in one call on a lent GPU machine.

    python -m bench.gpu_check [--out DIR] [--smoke] [--budget-s N]
    python -m bench.gpu_check --dry [--out DIR]          # `make gpu-check-dry`, on a CPU machine

The lent machine has CUDA torch but no DALI and no registry. If `nvidia.dali` does not
import, the bundle carried there beforehand (`python -m tools.gpu_bundle plan`: its parts in
/tmp/gw and `.gpu-wheels/part-N`) is unpacked into /tmp/site and this script runs again with
it on PYTHONPATH. So nothing at this module's top imports more than the standard library.
`--dry` rehearses that here: a bundle of the same pins for this Python (cached), unpacked into
a scratch site that comes first on PYTHONPATH, then every step in its CPU form within the
same budget; the JSON adds `estimated_device_minutes`, `bundle_parts` and `hardware_decoder`.

Then every step runs in its own child process under its own time limit, so a step that
fails, hangs or crashes DALI records that and the next one runs:
  machine  torch, CUDA, the GPU, DALI, cores
  corpus   a small ImageNet-like corpus drawn by the bench generator, packed at 256 (train,
           val) and at full size (train)
  decoder  the `mixed` decoder alone at hw_decoder_load 0 / 0.5 / 0.75 / 0.9 / 1.0 and DALI's default,
           then the proof that the hardware decoder ran: NVIDIA_DRIVER_CAPABILITIES, nvImageCodec's
           hardware backend on its own, NVML's JPEG-decoder utilisation at load 1.0 against 0, and
           the rates at 0 and 1.0 (`hardware_decoder` in the JSON: "used" / "not used" / null)
  auto     make_loader(..., num_threads="auto", hw_decoder_load="auto"): its choice and rate, and
           the hardware JPEG decoder's utilisation meanwhile (NVML; `nvjpg_util`)
  graphs   the train (`rrc`, `paper`) and val loaders' images/s
  model    AlexNet and AlexNet-BN bf16 forward+backward images/s, channels_last off and on
  rebuild  10 short epochs of the train loader: per-epoch start-up cost, device memory
  e2e      training steps on the loader, as many epochs as the rebuild cost measured just
           before leaves room for in its limit: data-wait share, device memory
  peers    DALI `mixed` rrc against nvImageCodec and SPDL nvJPEG decode + the same rrc in torch
           (`bench.gpu_peers`; a peer whose wheel is not there is left out with the reason)
  pytest   every `gpu`-marked test
It writes `gpu-check.json` (after every step, and as a step reports partial figures) and
`gpu-check.log` (everything printed, timestamped) under `--out`, and prints a table at the
end. `--smoke`, and any machine without CUDA, runs the same steps on the CPU at tiny sizes;
the CUDA-only ones are skipped with the reason.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.gpu_bundle import OUT as BUNDLE_DIR
from tools.gpu_bundle import estimate, find_parts, one_line, prepare, unpack

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
RESULT = "GPU_CHECK_RESULT "  # a child's last line: its result as JSON
PARTIAL = "GPU_CHECK_PARTIAL "  # a child's figures so far, kept if it is cut off
REEXEC_ENV = "GPU_CHECK_REEXEC"  # set on the run again after unpacking: what the unpack did
CARRIED = (Path("/tmp/gw"), BUNDLE_DIR)  # where the device calls leave the parts (tools.gpu_bundle plan)
SITE = Path("/tmp/site")
HW_LOADS = (0.0, 0.5, 0.75, 0.9, 1.0)
IMAGENET_TRAIN = 1_281_167
MIB = 2 ** 20


@dataclass(frozen=True)
class Sizes:
    """How much each step measures: GPU sizes by default, `SMOKE` for the CPU."""

    train_images: int = 4096
    val_images: int = 1024
    classes: int = 16
    shard_mb: float = 8
    batch: int = 256
    crop: int = 224
    decode_images: int = 1536
    warmup: int = 3
    window: int = 8
    repeats: int = 3
    decoder_repeats: int = 2
    decoder_window: int = 5  # 12 decoder sources, each built anew per round: shorter windows
    model_batch: int = 256
    model_crop: int = 224
    model_steps: int = 20
    e2e_model: str = "alexnet-bn"
    e2e_batch: int = 256
    e2e_steps: int = 160  # at most: fewer where the rebuild step's figures say its limit would not hold them
    e2e_warmup: int = 10
    rebuild_epochs: int = 10
    rebuild_world: int = 2  # the rebuild step reads rank 0's part of 2: half the set, 8 batches, per epoch


SMOKE = Sizes(train_images=64, val_images=32, classes=4, shard_mb=0.2, batch=16, decode_images=32,
              warmup=1, window=2, repeats=1, decoder_repeats=1, decoder_window=2, model_batch=2, model_crop=64,
              model_steps=1, e2e_batch=8, e2e_steps=4, e2e_warmup=1, rebuild_epochs=10, rebuild_world=2)


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float  # its share of the default --budget-s, scaled with it
    cuda_only: bool = False
    needs_corpus: bool = True


STEPS = (
    Step("machine", 15, needs_corpus=False),
    Step("corpus", 35, needs_corpus=False),
    Step("decoder", 45, cuda_only=True),
    Step("auto", 20),
    Step("graphs", 25),
    Step("model", 15, needs_corpus=False),
    Step("rebuild", 20),
    Step("e2e", 30),
    Step("peers", 30, cuda_only=True),
    Step("pytest", 60, needs_corpus=False),
)
DEFAULT_BUDGET_S = 300  # all steps' caps (295 s); the unpack comes before (`tools.gpu_bundle plan`)


class Skip(Exception):
    """A step that cannot run here: recorded as skipped with this reason."""


class StepFailed(Exception):
    """A step that ran and failed, with what it measured on the way."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------- DALI from the bundle
def dali_missing() -> str | None:
    """None where `nvidia.dali` imports; otherwise why not and what to do, in one line."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        return (f"nvidia.dali does not import ({one_line(err)}); carry the bundle's parts "
                "(python -m tools.gpu_bundle plan) and run again")
    return None


def run_again_with(site: Path, info: dict, argv: list[str]) -> None:
    """Run `python -m bench.gpu_check *argv` again with `site` first on PYTHONPATH (never returns)."""
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), *old]), REEXEC_ENV: json.dumps(info)}
    print(f"gpu-check: running again with {site} first on PYTHONPATH", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "bench.gpu_check", *argv], env)


def prepare_imports(argv: list[str]) -> None:
    """On the lent machine: where DALI does not import and the bundle's parts were carried
    (/tmp/gw, .gpu-wheels/part-N), unpack them into SITE and run again with it. Returns where
    there is nothing to do, or with the unpack's error in REEXEC_ENV for the report."""
    if os.environ.get(REEXEC_ENV) or not dali_missing() or find_parts(list(CARRIED))[0] is None:
        return
    print(f"gpu-check: unpacking the carried bundle into {SITE}", flush=True)
    try:
        info = unpack(list(CARRIED), SITE)
    except (OSError, ValueError) as err:
        os.environ[REEXEC_ENV] = json.dumps({"error": one_line(err)})
        return
    run_again_with(SITE, info, argv)


def prepare_dry(argv: list[str]) -> None:
    """`--dry`: the bundle's pins for this Python (prepared once per machine, under
    ~/.cache/alexnet-dali/gpu-bundle/), unpacked into a scratch site, and the run again with it."""
    from tools.gpu_bundle import DROP_DIRS, DROP_FILES, PINS

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    preset = "6"  # the device bundle is 9e: same files, 10 min less to compress here, a few % larger
    key = hashlib.sha256(repr((PINS.read_text(), DROP_DIRS, DROP_FILES, preset)).encode()).hexdigest()[:12]
    out = Path.home() / ".cache" / "alexnet-dali" / "gpu-bundle" / f"py{python}-{key}"
    t0 = time.perf_counter()
    try:
        if not find_parts([out])[1]:
            print(f"gpu-check --dry: preparing the bundle for Python {python} in {out} (once per machine)", flush=True)
            prepare(out, python, preset, cache=out.parent / f"wheels-py{python}")
        site = Path(tempfile.mkdtemp(prefix="alexnet-gpu-dry-site-"))
        info = {**unpack([out], site), "bundle": str(out), "scratch": True,
                "prepare_s": round(time.perf_counter() - t0, 1)}
    except (OSError, ValueError, SystemExit) as err:
        os.environ[REEXEC_ENV] = json.dumps({"error": f"the rehearsal's bundle: {one_line(err)}"})
        return
    run_again_with(site, info, argv)


def dry_figures(install: dict, budget_s: float) -> dict:
    """The rehearsal's answer for the device: parts and device minutes of the device bundle
    (`.gpu-wheels`, where prepared), else of the rehearsal's own, with the unpack time measured here."""
    out: dict[str, Any] = {"bundle": install.get("bundle"), "unpack_s": install.get("unpack_s")}
    bundles = {"device bundle (.gpu-wheels)": BUNDLE_DIR, "the rehearsal's bundle": Path(install.get("bundle") or "-")}
    for source, where in bundles.items():
        info = find_parts([where])[0]
        if info is None:
            continue
        plan = estimate(info, budget_s, install.get("unpack_s"))
        out.update(bundle_parts=len(info["parts"]), bundle_parts_source=source,
                   estimated_device_minutes=plan["estimated_device_minutes"],
                   device_plan={"python": info["python"], "compressed_mib": info["compressed_mib"], **plan})
        break
    return out


# ---------------------------------------------------------------- the run: log, report, steps
class Log:
    """Print and append to the log file, each line timestamped with the time since start."""

    def __init__(self, path: Path) -> None:
        self.path, self.t0 = path, time.perf_counter()
        self.file = path.open("a", buffering=1)

    def say(self, message: str) -> None:
        stamp = f"{dt.datetime.now():%H:%M:%S} +{time.perf_counter() - self.t0:6.1f}s"
        for line in str(message).splitlines() or [""]:
            print(f"{stamp} {line}", flush=True)
            self.file.write(f"{stamp} {line}\n")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_step(step: Step, ctx_file: Path, timeout_s: float, log: Log, env: dict,
             on_partial: Callable[[dict], None] = lambda partial: None) -> dict:
    """Run one step in a child process, its output into the log; kill it (and whatever it
    started) at `timeout_s`. Returns its entry for the report; `on_partial(figures)` as the
    child reports figures on the way (kept in the entry if it is cut off)."""
    cmd = [sys.executable, "-m", "bench.gpu_check", "--step", step.name, "--ctx", str(ctx_file)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    payload: dict = {}
    partial: dict = {}
    tail: deque[str] = deque(maxlen=40)

    def read() -> None:
        for line in proc.stdout:
            if line.startswith(RESULT):
                payload.update(json.loads(line[len(RESULT):]))
            elif line.startswith(PARTIAL):
                partial.update(json.loads(line[len(PARTIAL):]))
                on_partial(partial)
            else:
                tail.append(line.rstrip())
                log.say(f"  [{step.name}] {line.rstrip()}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        timed_out = True
    reader.join(timeout=10)
    entry = {"status": payload.get("status", "error"), "seconds": round(time.perf_counter() - t0, 2),
             "timeout_s": round(timeout_s, 1), "result": payload.get("result"), "error": payload.get("error"),
             "reason": payload.get("reason")}
    if partial and entry["status"] != "ok":
        entry["partial"] = partial
    if timed_out:
        entry.update(status="timeout", error=f"killed after its {timeout_s:.0f} s limit (--budget-s / --step-budget)",
                     tail=list(tail)[-15:])
    elif not payload:
        last = next((ln for ln in reversed(tail) if ln.strip()), "no output")
        entry.update(error=f"the step's process exited with code {proc.returncode} without a result: {last[:300]}",
                     tail=list(tail)[-15:])
    return entry


def plan_timeouts(budget_s: float, overrides: dict[str, float]) -> dict[str, float]:
    scale = budget_s / DEFAULT_BUDGET_S
    return {s.name: overrides.get(s.name, s.budget_s * scale) for s in STEPS}


def step_limit(step: Step, left: float, planned: dict[str, float], overrides: dict[str, float],
               to_run: list[Step]) -> float:
    """A step's limit: its planned share of what is left of the budget, shared with the steps
    still to run (`to_run`, this one included), so time an earlier step did not use (or a
    step skipped here) goes to the later ones; `--step-budget` values as given."""
    if step.name in overrides:
        return min(overrides[step.name], left)
    fixed = sum(min(overrides[s.name], left) for s in to_run if s.name in overrides)
    shares = sum(planned[s.name] for s in to_run if s.name not in overrides)
    return max(0.0, min(left, (left - fixed) * planned[step.name] / shares))


def check(args: argparse.Namespace, argv: list[str]) -> int:
    """The whole check: install, then every step in turn, the report after each."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu-check.log")
    report_path = out / "gpu-check.json"
    started = time.perf_counter()
    report: dict[str, Any] = {"schema": SCHEMA, "started": dt.datetime.now().isoformat(timespec="seconds"),
                              "argv": argv, "budget_s": args.budget_s, "mode": None, "dry": args.dry,
                              "hardware_decoder": None, "steps": {}}
    install = json.loads(os.environ.get(REEXEC_ENV) or "{}")
    report["install"] = install
    if args.dry:
        report.update(dry_figures(install, args.budget_s))
    dali_error = install.get("error") or dali_missing()
    if dali_error:
        report.update(ok=False, error=dali_error)
        write_json(report_path, report)
        log.say(f"gpu-check: {dali_error}")
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="alexnet-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = dict(args.step_budget)
    timeouts = plan_timeouts(args.budget_s, overrides)
    deadline = started + args.budget_s
    ctx: dict[str, Any] = {"work": str(work), "fail": args.fail, "device": "cpu", "sizes": asdict(SMOKE),
                           "site": install.get("site") if args.dry else None, "timeouts": dict(timeouts)}
    ctx_file = work / "ctx.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))}
    log.say(f"gpu-check: out {out}, work {work}, budget {args.budget_s:.0f} s")
    for i, step in enumerate(STEPS):
        write_json(ctx_file, ctx)
        left = deadline - time.perf_counter()
        to_run = [s for s in STEPS[i:] if not (s.cuda_only and ctx["device"] != "cuda")]
        if step.cuda_only and ctx["device"] != "cuda":
            entry = {"status": "skipped", "reason": f"needs CUDA; this run is on the CPU ({report['mode_reason']})"}
        elif step.needs_corpus and "corpus" not in ctx:
            entry = {"status": "skipped", "reason": "needs the corpus, which the corpus step did not make"}
        elif left < 5:
            entry = {"status": "skipped", "reason": f"the run's budget ({args.budget_s:.0f} s) is spent"}
        else:
            limit = step_limit(step, left, timeouts, overrides, to_run)
            log.say(f"== {step.name} (at most {limit:.0f} s)")
            ctx["timeouts"][step.name] = limit
            write_json(ctx_file, ctx)

            def partial(figures: dict, name: str = step.name) -> None:
                report["steps"][name] = {"status": "running", "partial": figures}
                write_json(report_path, report)

            entry = run_step(step, ctx_file, limit, log, env, partial)
        report["steps"][step.name] = entry
        log.say(f"== {step.name}: {entry['status']}" + "".join(
            f" ({entry[k]})" for k in ("error", "reason") if entry.get(k)))
        if step.name == "machine":
            cuda = entry["status"] == "ok" and entry["result"]["cuda"]
            ctx["device"] = "cuda" if cuda and not args.smoke else "cpu"
            report["mode"] = "gpu" if ctx["device"] == "cuda" else "dry" if args.dry else "smoke"
            report["mode_reason"] = ("CUDA GPU" if ctx["device"] == "cuda" else "--dry" if args.dry else
                                     "--smoke" if args.smoke else "torch sees no CUDA GPU")
            sizes = Sizes() if ctx["device"] == "cuda" else SMOKE
            ctx["sizes"] = report["sizes"] = asdict(sizes)
            ctx["threads"] = (entry["result"] or {}).get("cores") or os.cpu_count() or 1
        if step.name == "corpus" and entry["status"] == "ok":
            ctx["corpus"] = entry["result"]
        if step.name in ("model", "rebuild") and entry["status"] == "ok":
            ctx[step.name] = entry["result"]  # e2e sizes its run from them
        if step.name == "decoder" and (entry.get("result") or {}).get("hardware_decoder"):
            report["hardware_decoder"] = entry["result"]["hardware_decoder"]
        report["wall_s"] = round(time.perf_counter() - started, 1)
        write_json(report_path, report)
    bad = [n for n, e in report["steps"].items() if e["status"] in ("error", "timeout")]
    if report["hardware_decoder"] and report["hardware_decoder"]["verdict"] == "not used":
        log.say(f"gpu-check: hardware decoder not used ({report['hardware_decoder']['why']}): the decoder "
                "and auto figures are nvJPEG's CUDA path only")
    report.update(ok=not bad, failed=bad, finished=dt.datetime.now().isoformat(timespec="seconds"),
                  wall_s=round(time.perf_counter() - started, 1))
    write_json(report_path, report)
    for line in table(report):
        log.say(line)
    log.say(f"gpu-check: {'all steps ran' if not bad else 'failed: ' + ', '.join(bad)}; wrote {report_path}")
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if install.get("scratch"):  # the rehearsal's site
        shutil.rmtree(install["site"], ignore_errors=True)
    return 0 if not bad else 1


def table(report: dict) -> list[str]:
    rows = [f"{'step':<9} {'status':<8} {'s':>6}  figure", "-" * 72]
    for name, e in report["steps"].items():
        figure = headline(name, e["result"]) if e["status"] == "ok" and e.get("result") else (
            e.get("error") or e.get("reason") or "")
        rows.append(f"{name:<9} {e['status']:<8} {e.get('seconds', 0):6.1f}  {figure[:110]}")
    return rows


def headline(name: str, r: dict) -> str:
    """The step's figures in one line."""
    def rate(fig: dict | None) -> str:
        return f"{fig['median']:.0f}/s" if fig else "-"

    if name == "machine":
        return f"{r.get('gpu') or 'no GPU'}, torch {r['torch']}, DALI {r.get('dali')}, {r['cores']} cores"
    if name == "corpus":
        return f"{r['train_images']} train + {r['val_images']} val images in {r['seconds']:.0f} s"
    if name == "decoder":
        hw = r.get("hardware_decoder") or {}
        return (f"hardware decoder {hw.get('verdict')}; mixed 256: "
                + ", ".join(f"{k} {rate(v)}" for k, v in r["rates"]["256"].items()))
    if name == "auto":
        nvjpg = r.get("nvjpg_util")
        busy = f", NVJPG busy {nvjpg['mean']:.0%} (max {nvjpg['max']:.0%})" if nvjpg else ""
        hw = (r.get("tuning") or {}).get("hardware_decoder")
        said = f", hardware decoder {hw}" if hw else ""
        return (f"chose threads {r['num_threads']}, hw load {r['hw_decoder_load']}: {rate(r['images_per_s'])}"
                f"{busy}{said}")
    if name == "graphs":
        return ", ".join(f"{k} {rate(v['images_per_s'])}" for k, v in r["loaders"].items())
    if name == "model":
        return ", ".join(f"{k} {v['images_per_s']:.0f}/s" for k, v in r["rates"].items())
    if name == "e2e":
        mem = f", peak {r['max_memory_allocated_mib']:.0f} MiB" if r.get("max_memory_allocated_mib") else ""
        return f"{r['images_per_s']:.0f} images/s, data wait {r['data_wait_share']['overall']:.1%}{mem}"
    if name == "rebuild":
        return (f"start-up {r['start_up_s']['median']:.3f} s/epoch = {r['share_of_epoch']:.1%} of these, "
                f"memory growth {r['memory_growth_mib']} MiB")
    if name == "pytest":
        return f"{r['summary']}"
    return ""


# ---------------------------------------------------------------- the steps (child processes)
def run_child(name: str, ctx_file: Path) -> int:
    ctx = json.loads(Path(ctx_file).read_text())
    payload: dict[str, Any]
    try:
        for spec in ctx["fail"]:  # --fail NAME[:hang|:late]: break one step on purpose
            if spec.split(":")[0] == name:
                if spec.endswith(":late"):
                    global _DIE_AFTER_PARTIAL
                    _DIE_AFTER_PARTIAL = True
                    continue
                if spec.endswith(":hang"):
                    print(f"{name}: hanging on purpose (--fail {spec})", flush=True)
                    time.sleep(10 ** 6)
                raise RuntimeError(f"forced failure (--fail {spec})")
        payload = {"status": "ok", "result": STEP_FUNCS[name](ctx)}
    except Skip as why:
        payload = {"status": "skipped", "reason": str(why)}
    except StepFailed as err:
        payload = {"status": "error", "error": str(err), "result": err.result}
    except Exception as err:  # noqa: BLE001  a step's failure is its record; the run goes on
        traceback.print_exc(file=sys.stdout)
        payload = {"status": "error", "error": one_line(err)}
    print(RESULT + json.dumps(payload, default=str), flush=True)
    return 0


_DIE_AFTER_PARTIAL = False  # --fail STEP:late: the step's process dies after its first partial report


def partial(**figures: Any) -> None:
    """Report figures so far: kept in the JSON if the step is cut off (its limit, a crash)."""
    print(PARTIAL + json.dumps(figures, default=str), flush=True)
    if _DIE_AFTER_PARTIAL:
        print("dying on purpose after a partial report (--fail STEP:late)", flush=True)
        os._exit(3)


def _sizes(ctx: dict) -> Sizes:
    return Sizes(**ctx["sizes"])


def _cuda(ctx: dict) -> bool:
    return ctx["device"] == "cuda"


def _sync(ctx: dict) -> None:
    if _cuda(ctx):
        import torch

        torch.cuda.synchronize()


def _device_memory_mib() -> dict | None:
    """Device memory in use on the whole GPU (DALI's pools are not torch's), MiB; None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"used": round((total - free) / MIB, 1), "total": round(total / MIB, 1)}


def step_machine(ctx: dict) -> dict:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cores": len(os.sched_getaffinity(0)), "gpu": None,
                            # the container's driver capabilities: the hardware JPEG decoder needs "video"
                            "nvidia_driver_capabilities": os.environ.get("NVIDIA_DRIVER_CAPABILITIES")}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
        info["dali_from"] = str(Path(nvidia.dali.__file__).parent)
    except ImportError as err:
        info["dali"] = None
        info["dali_error"] = one_line(err)
    from importlib.metadata import PackageNotFoundError, version

    info["versions"] = {}
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12",
                 "nvidia-nvjpeg", "nvidia-nvjpeg-cu12", "pydantic", "webdataset"):
        try:
            info["versions"][dist] = version(dist)
        except PackageNotFoundError:
            pass
    if ctx.get("site") and not str(info.get("dali_from", "")).startswith(ctx["site"]):
        raise RuntimeError(f"DALI imports from {info.get('dali_from')}, not from the unpacked bundle {ctx['site']}: "
                           "the rehearsal would not test the bundle")
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count())
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    print(json.dumps(info), flush=True)
    return info


def step_corpus(ctx: dict) -> dict:
    """The bench generator's images (`bench.corpus`), the last `val_images` moved to
    val, packed by the packer at shorter side 256 (train, val) and at full size (train)."""
    from bench.corpus import CorpusSpec, describe_shards, write_tree
    from shards.pack import build

    s, t0 = _sizes(ctx), time.perf_counter()
    root = Path(ctx["work"]) / "corpus"
    shutil.rmtree(root, ignore_errors=True)
    spec = CorpusSpec(images=s.train_images + s.val_images, classes=s.classes, shard_size_mb=int(max(1, s.shard_mb)))
    tree = write_tree(spec, root / "source", workers=ctx["threads"])
    for path in sorted((tree / "train").rglob("*.JPEG")):
        if int(path.stem.rsplit("_", 1)[1]) >= s.train_images:
            (tree / "val" / path.parent.name).mkdir(parents=True, exist_ok=True)
            path.rename(tree / "val" / path.parent.name / path.name)
    drawn = time.perf_counter() - t0
    sets = {"256": root / "shards-256", "full": root / "shards-full"}
    build(tree, sets["256"], splits=("train", "val"), shorter_side=256, quality=spec.quality,
          workers=ctx["threads"], shard_size_mb=s.shard_mb, progress=False)
    build(tree, sets["full"], splits=("train",), shorter_side=0, quality=spec.quality,
          workers=ctx["threads"], shard_size_mb=s.shard_mb * 4, progress=False)
    shutil.rmtree(tree)
    described = {name: describe_shards(path) for name, path in sets.items()}
    return {"shards_256": str(sets["256"]), "shards_full": str(sets["full"]), "train_images": s.train_images,
            "val_images": s.val_images, "classes": s.classes, "draw_s": round(drawn, 1),
            "seconds": round(time.perf_counter() - t0, 1), "described": described,
            "tars": {name: len(list((p / "train").glob("*.tar"))) for name, p in sets.items()}}


def step_decoder(ctx: dict) -> dict:
    """The mixed decoder alone, at each hardware share, on the JPEGs training reads (256) and
    on full-size ones, interleaved rounds."""
    from bench.decode import dali_decode_source, load_jpegs
    from bench.timing import measure_interleaved

    s = _sizes(ctx)
    loads = [None, *HW_LOADS]
    sources, names, jpegs = [], {}, {}
    for key in ("256", "full"):
        blobs = jpegs[key] = load_jpegs(Path(ctx["corpus"][f"shards_{key}"]), limit=s.decode_images)
        for load in loads:
            label = "default" if load is None else f"{load:g}"
            name = f"mixed {key} hw_decoder_load {label}"
            names[name] = (key, label)
            sources.append(dali_decode_source(name, blobs, "mixed", ctx["threads"], s.batch, load))
    timed = measure_interleaved(sources, s.warmup, s.decoder_window, s.decoder_repeats, progress=print)
    rates: dict[str, dict] = {"256": {}, "full": {}}
    for name, (key, label) in names.items():
        rates[key][label] = timed[name]["images_per_s"]
    best = {key: max(r, key=lambda k: r[k]["median"]) for key, r in rates.items()}
    out = {"threads": ctx["threads"], "batch": s.batch, "images": s.decode_images, "rates": rates, "best": best,
           "first_batch_s": {n: timed[n]["first_batch_s"]["median"] for n in names}}
    partial(**out)
    blobs = jpegs["256"]
    util = {}
    for load in (0.0, 1.0):  # NVML's JPEG-decoder utilisation while each share decodes
        source = dali_decode_source(f"mixed 256 hw_decoder_load {load:g}", blobs, "mixed", ctx["threads"], s.batch,
                                    load)
        with NvjpgSampling(ctx["device"]) as nvjpg:
            batches = source.open()
            try:
                for _, _ in zip(range(3 * s.decoder_window), batches):
                    pass
                _sync(ctx)
            finally:
                batches.close()
        util[f"{load:g}"] = nvjpg.summary()
    out["hardware_decoder"] = hardware_verdict(os.environ.get("NVIDIA_DRIVER_CAPABILITIES"), nvimgcodec_hw(blobs[0]),
                                               util, rates["256"]["0"], rates["256"]["1"])
    return out


def nvimgcodec_hw(jpeg: bytes) -> dict:
    """Whether nvImageCodec's hardware JPEG backend alone decodes an image here (the library
    DALI's `mixed` decoder goes through): {"ok": bool, "reason": ...}."""
    try:
        from nvidia import nvimgcodec

        decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        image = decoder.decode(jpeg)
    except Exception as err:  # noqa: BLE001  not loadable here is the finding
        return {"ok": False, "reason": one_line(err)}
    if image is None:
        return {"ok": False, "reason": "the hardware backend decoded nothing (not loaded, or no JPEG engine)"}
    return {"ok": True, "shape": list(image.shape)}


def hardware_verdict(capabilities: str | None, hw_backend: dict, util: dict[str, dict | None], rate_0: dict,
                     rate_1: dict) -> dict:
    """"not used" where nvImageCodec's hardware backend does not decode, or NVML saw the JPEG
    engines idle all through load 1.0, or, where NVML does not read, loads 0 and 1.0 decode at
    the same rate within their spread across rounds. NVML's busy engines are direct evidence
    (as in `pipeline.tuning.hardware_verdict`): equal rates then only say that the hardware
    decoder is no faster here, and are noted."""
    why, notes = [], []
    if capabilities is not None and not ({"all", "video"} & set(capabilities.replace(" ", "").split(","))):
        notes.append(f"NVIDIA_DRIVER_CAPABILITIES={capabilities} lacks video")
    if not hw_backend["ok"]:
        why.append(f"nvImageCodec's hardware backend: {hw_backend['reason']}")
    at_1 = util.get("1")
    overlap = rate_1["min"] <= rate_0["max"] and rate_0["min"] <= rate_1["max"]
    same = (f"hw_decoder_load 0 and 1.0 decode at the same rate within noise ({rate_0['median']:.0f} and "
            f"{rate_1['median']:.0f} images/s, ranges overlap)")
    if at_1 is not None and at_1["max"] == 0:
        why.append(f"NVML: JPEG decoder utilisation 0 over {at_1['samples']} samples at hw_decoder_load 1.0")
    elif at_1 is None and overlap:
        why.append(same + "; NVML did not read")
    elif overlap:
        notes.append(same + ": busy, but no faster here")
    return {"verdict": "not used" if why else "used", "why": "; ".join(why + notes) if why else None,
            "notes": notes, "nvidia_driver_capabilities": capabilities, "nvimgcodec_hw_backend": hw_backend,
            "nvjpg_util": util, "images_per_s": {"0": rate_0["median"], "1": rate_1["median"]}}


def _loader(ctx: dict, split: str = "train", **kw):
    from pipeline import make_loader

    s = _sizes(ctx)
    kw.setdefault("num_threads", ctx["threads"])
    kw.setdefault("crop_size", s.crop)
    return make_loader(ctx["corpus"]["shards_256"], split=split, batch_size=kw.pop("batch_size", s.batch),
                       device=ctx["device"], seed=0, **kw)


def step_auto(ctx: dict) -> dict:
    """make_loader's "auto" settings: what it probed, what it chose, the rate of its choice."""
    from bench.timing import loader_source, measure_interleaved

    s = _sizes(ctx)
    auto = {"num_threads": "auto", **({"hw_decoder_load": "auto"} if _cuda(ctx) else {})}
    t0 = time.perf_counter()
    loader = _loader(ctx, **auto)  # probes before it returns (pipeline.tuning)
    made_s = time.perf_counter() - t0
    with NvjpgSampling(ctx["device"]) as nvjpg:  # is the hardware decoder busy at the share chosen?
        timed = measure_interleaved([loader_source("auto", loader)], s.warmup, s.window, s.repeats, progress=print)
    return {"asked": auto, "num_threads": loader.settings["num_threads"],
            "hw_decoder_load": loader.settings["hw_decoder_load"], "tuning": loader.tuning,
            "make_loader_s": round(made_s, 2), "images_per_s": timed["auto"]["images_per_s"],
            "nvjpg_util": nvjpg.summary()}


class NvjpgSampling:
    """NVML's hardware JPEG decoder utilisation (`pipeline.nvjpg`), read every 0.2 s on a
    thread while the block runs: {mean, max, samples}, or None where it is not measured."""

    def __init__(self, device: str) -> None:
        import threading

        import torch

        from pipeline.nvjpg import NvjpgMeter

        self.meter = NvjpgMeter(torch.device("cuda" if device == "cuda" else "cpu"))
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if (value := self.meter.read()) is not None:
                self.values.append(value)

    def __enter__(self) -> NvjpgSampling:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict | None:
        if not self.values:
            return None
        return {"mean": round(sum(self.values) / len(self.values), 3), "max": max(self.values),
                "samples": len(self.values)}


def step_graphs(ctx: dict) -> dict:
    """The train (rrc, paper) and val loaders at crop 224, batch 256, interleaved rounds."""
    from bench.timing import loader_source, measure_interleaved

    s = _sizes(ctx)
    loaders = {"train rrc": _loader(ctx, crop="rrc"), "train paper": _loader(ctx, crop="paper"),
               "val": _loader(ctx, "val")}
    timed = measure_interleaved([loader_source(n, ld) for n, ld in loaders.items()], s.warmup, s.window,
                                s.repeats, progress=print)
    return {"device": ctx["device"], "batch": s.batch, "crop": s.crop, "threads": ctx["threads"],
            "hw_decoder_load": "DALI default", "loaders": timed}


def model_rate(name: str, channels_last: bool, batch: int, crop: int, steps: int, device: str) -> float:
    """Images/s of forward+backward of `name` (after 2 warm-up steps, `bench.model.step_seconds`),
    bf16 autocast on CUDA (fp32 on the CPU, where bf16 is slow and only the code path is under test)."""
    import torch

    from bench.model import step_seconds
    from model import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_model(name).to(device).train().to(memory_format=fmt)
    dtype = "bf16" if device == "cuda" else "fp32"
    return batch / step_seconds(net, batch, crop, steps, dtype, channels_last, device, warmup=2)


def step_model(ctx: dict) -> dict:
    from bench.figures import figure

    s = _sizes(ctx)
    configs = [(m, cl) for m in ("alexnet", "alexnet-bn") for cl in (False, True)]
    runs: dict[str, list[float]] = {f"{m} channels_last {'on' if cl else 'off'}": [] for m, cl in configs}
    for r in range(s.repeats):
        for (m, cl), key in zip(configs, runs):
            runs[key].append(model_rate(m, cl, s.model_batch, s.model_crop, s.model_steps, ctx["device"]))
            print(f"  round {r + 1}/{s.repeats}  {key:<32} {runs[key][-1]:9.1f} images/s", flush=True)
        partial(rounds=r + 1, images_per_s=runs)
    rates = {k: {"images_per_s": figure(v)["median"], "figure": figure(v)} for k, v in runs.items()}
    return {"device": ctx["device"], "dtype": "bf16 autocast" if _cuda(ctx) else "fp32", "batch": s.model_batch,
            "crop": s.model_crop, "steps": s.model_steps, "rates": rates}


def e2e_steps(ctx: dict, batches_per_epoch: int) -> tuple[int, dict]:
    """How many timed steps fit in half the e2e step's limit, from what the rebuild step just
    measured (the start-up of an epoch, the steady batch) and the model step's rate; at most
    `e2e_steps`, at least one epoch. Without those figures: one epoch and a half."""
    s = _sizes(ctx)
    rebuild, model = ctx.get("rebuild"), ctx.get("model")
    if not rebuild or not model:
        return min(s.e2e_steps, max(1, batches_per_epoch * 3 // 2)), {"from": "default: no rebuild/model figures"}
    train = model["rates"].get(f"{s.e2e_model} channels_last on") or next(iter(model["rates"].values()))
    batch_s = s.e2e_batch / rebuild["steady_images_per_s"] + s.e2e_batch / train["images_per_s"]
    epoch_s = rebuild["start_up_s"]["max"] + batches_per_epoch * batch_s
    room = 0.5 * ctx["timeouts"]["e2e"] - 2 * rebuild["epochs"][0]["first_batch_s"]  # build and warm-up
    epochs = max(1.0, room / epoch_s)
    steps = max(1, min(s.e2e_steps, int(epochs * batches_per_epoch) - s.e2e_warmup))
    return steps, {"from": "rebuild and model steps", "epoch_s": round(epoch_s, 3), "room_s": round(room, 1)}


def step_e2e(ctx: dict) -> dict:
    """Training steps on the loader (bf16 autocast on the GPU, channels_last, SGD), each timed as the
    wait for the next batch against the whole step (`bench.e2e.train_steps`, the device
    synchronised at its end), and the device memory at the end. As many steps as the rebuild
    step's figures say fit (`e2e_steps`): every epoch rebuilds the pipeline."""
    import torch

    from bench.e2e import train_steps
    from model import build_model
    from pipeline.usage import rss_mib

    s, device = _sizes(ctx), ctx["device"]
    crop = s.crop if _cuda(ctx) else s.model_crop
    loader = _loader(ctx, crop_size=crop, batch_size=s.e2e_batch)
    steps, sized = e2e_steps(ctx, len(loader))
    print(f"  {steps} timed steps ({len(loader)} per epoch; {sized})", flush=True)
    torch.manual_seed(0)
    net = build_model(s.e2e_model, num_classes=ctx["corpus"]["classes"]).to(device).train()
    net = net.to(memory_format=torch.channels_last)
    if _cuda(ctx):
        torch.cuda.reset_peak_memory_stats()
    # CPU bf16 is slow and not the point: fp32 there
    run = train_steps(loader, net, device, steps, s.e2e_warmup, windows=min(5, steps), bf16=_cuda(ctx),
                      channels_last=True, weight_decay=5e-5)
    out = {"device": device, "model": s.e2e_model, "precision": "bf16 autocast" if _cuda(ctx) else "fp32",
           "batch": s.e2e_batch, "crop": crop, **run, "steps_sized": sized, "rss_mib": rss_mib()}
    if _cuda(ctx):
        out.update(max_memory_allocated_mib=round(torch.cuda.max_memory_allocated() / MIB, 1),
                   device_memory_mib=_device_memory_mib())
    return out


def step_rebuild(ctx: dict) -> dict:
    """10 short epochs of the train loader (rank 0's part of `rebuild_world`): per epoch the
    seconds to its first batch (whatever a pass builds) against the whole epoch, and device
    memory in use (host RSS on the CPU) after each; epoch 2 against epoch 10."""
    from bench.figures import figure
    from bench.timing import time_passes

    s = _sizes(ctx)
    loader = _loader(ctx, rank=0, world_size=s.rebuild_world)
    epochs: list[dict] = []

    def record(run: dict) -> None:
        mem = _device_memory_mib()
        epochs.append({"epoch": len(epochs) + 1, "first_batch_s": round(run["first_batch_s"], 4),
                       "epoch_s": round(run["pass_s"], 4), "batches": run["batches"],
                       "device_used_mib": mem["used"] if mem else None, "rss_mib": run["rss_mib"]})
        e = epochs[-1]
        partial(epochs=epochs)
        print(f"  epoch {e['epoch']}: first batch {e['first_batch_s']:.3f} s of {e['epoch_s']:.3f} s, "
              f"{e['batches']} batches, {'device ' + str(mem['used']) if mem else 'rss ' + str(e['rss_mib'])} MiB",
              flush=True)

    time_passes(loader, s.rebuild_epochs, sync=lambda: _sync(ctx), after=record)
    later = epochs[1:]  # the first epoch also pays the process's first pipeline build
    if min(e["batches"] for e in later) < 2:
        raise RuntimeError(f"rebuild: {later[0]['batches']} batch per epoch; the steady rate needs 2 or more")
    # the batches after the first were prefetched while it waited: the steady rate comes out
    # high and the start-up cost (first batch less one steady batch) errs on the large side
    per_batch = statistics.median((e["epoch_s"] - e["first_batch_s"]) / (e["batches"] - 1) for e in later)
    start_up = [max(0.0, e["first_batch_s"] - per_batch) for e in later]
    rate = s.batch / per_batch
    key = "device_used_mib" if _cuda(ctx) else "rss_mib"
    return {"device": ctx["device"], "world_size": s.rebuild_world, "batch": s.batch, "epochs": epochs,
            "start_up_s": figure(start_up, unit="s"), "steady_images_per_s": round(rate, 1),
            "share_of_epoch": round(sum(start_up) / sum(e["epoch_s"] for e in later), 4),
            # one GPU's ImageNet epoch at the steady rate: what one start-up costs there
            "share_of_imagenet_epoch": round(statistics.median(start_up) / (IMAGENET_TRAIN / rate), 6),
            "memory": key, "memory_epoch_2_mib": epochs[1][key], "memory_epoch_last_mib": epochs[-1][key],
            "memory_growth_mib": (round(epochs[-1][key] - epochs[1][key], 1)
                                  if epochs[1][key] is not None else None)}


def step_pytest(ctx: dict) -> dict:
    """Every `gpu`-marked test (the files that carry the marker), in a pytest child."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if re.search(r"pytest\.mark\.gpu\b", p.read_text()))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *files]
    print("$ " + " ".join(cmd), flush=True)
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line.rstrip())
            print(line.rstrip(), flush=True)
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error|"
                                                                           r"deselected|no tests)", ln)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    result = {"rc": proc.returncode, "files": files, "summary": summary, "counts": counts,
              "collection_errors": sorted({m for m in re.findall(r"^ERROR (tests/\S+?\.py)", "\n".join(lines), re.M)}),
              "tail": "\n".join(lines[-60:])[-6000:]}
    if proc.returncode != 0:
        raise StepFailed(f"pytest -m gpu: {summary or 'no summary'} (exit code {proc.returncode})", result)
    return result


def step_peers(ctx: dict) -> dict:
    """The GPU peers (issue 27) against DALI `mixed`, at the check's batch and crop."""
    from bench.gpu_peers import measure

    s = _sizes(ctx)
    out = measure(Path(ctx["corpus"]["shards_256"]), s.batch, s.crop, ctx["threads"], s.decode_images, s.warmup,
                  s.window, s.repeats)
    if not out["loaders"]:
        raise Skip("no GPU peer imports here: " + "; ".join(f"{n}: {why}" for n, why in out["skipped"].items()))
    return out


STEP_FUNCS: dict[str, Callable[[dict], dict]] = {
    "machine": step_machine, "corpus": step_corpus, "decoder": step_decoder, "auto": step_auto,
    "graphs": step_graphs, "model": step_model, "e2e": step_e2e, "rebuild": step_rebuild, "peers": step_peers,
    "pytest": step_pytest,
}


# ---------------------------------------------------------------- command line
def _step_budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in STEP_FUNCS or not seconds:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP=SECONDS, STEP one of {', '.join(STEP_FUNCS)}")
    return name, float(seconds)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu-check", help="where gpu-check.json and gpu-check.log go")
    p.add_argument("--smoke", action="store_true", help="the CPU run at tiny sizes (also when CUDA is absent)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="the whole run's time bound, shared by the steps (what one leaves goes to the later ones)")
    p.add_argument("--step-budget", type=_step_budget, action="append", default=[], metavar="STEP=SECONDS",
                   help="one step's time limit")
    p.add_argument("--fail", action="append", default=[], metavar="STEP[:hang|:late]",
                   help="break a step on purpose (raise; hang until its limit; die after its first partial "
                   "figures): tests the isolation")
    p.add_argument("--work", help="where the corpus goes (default: a temporary folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--dry", action="store_true",
                   help="rehearse on this CPU machine: the bundle for this Python unpacked into a scratch site, "
                   "every step in its CPU form (`make gpu-check-dry`)")
    p.add_argument("--step", choices=sorted(STEP_FUNCS), help=argparse.SUPPRESS)
    p.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [f for f in args.fail if f.split(":")[0] not in STEP_FUNCS]
    if unknown:
        p.error(f"--fail {unknown[0]}: no such step; steps: {', '.join(STEP_FUNCS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.step:
        return run_child(args.step, args.ctx)
    if args.dry:
        args.smoke = True
        if not os.environ.get(REEXEC_ENV):
            prepare_dry(argv)  # runs this again with the bundle, or returns with its error
    else:
        prepare_imports(argv)
    return check(args, argv)


if __name__ == "__main__":
    sys.exit(main())
