"""Config loading and its errors, checkpoints and metrics files: no Ray needed."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from orchestration.checkpoint import FILE, KEYS, load_checkpoint, write_checkpoint
from orchestration.config import check_shards, from_dict, load_config, parse_overrides, valid_keys
from orchestration.metrics import MetricsLog, plot_curves, summarize
from shards.location import resolve

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "storage_path": "runs", "shards_dir": "data/shards", "model": "alexnet-bn",
        "epochs": 2, "batch_size": 8, "workers": 2, "use_gpu": False}


def write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "imagenet-paper.yaml", "imagenet-fast.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert Path(cfg.shards_dir).is_absolute() and Path(cfg.storage_path).is_absolute()


def test_paper_and_fast_recipes_say_what_the_issue_asks() -> None:
    paper = load_config(ROOT / "configs" / "imagenet-paper.yaml")
    assert (paper.model, paper.batch_size * paper.workers, paper.momentum, paper.weight_decay, paper.lr) == \
        ("alexnet", 128, 0.9, 0.0005, 0.01)
    assert (paper.schedule, paper.plateau_factor, paper.crop, paper.eval_crop) == ("plateau", 0.1, "paper", "ten_crop")
    fast = load_config(ROOT / "configs" / "imagenet-fast.yaml", ["workers=4"])
    assert fast.model == "alexnet-bn" and fast.use_gpu and fast.precision == "bf16" and fast.channels_last
    assert fast.peak_lr == pytest.approx(fast.lr * fast.batch_size * 4 / fast.lr_base_batch)
    assert fast.schedule == "cosine" and fast.warmup_epochs > 0 and fast.label_smoothing > 0 and fast.crop == "rrc"
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.workers == 2 and not demo.use_gpu and demo.model.startswith("alexnet")


def test_overrides_typed_and_relative_paths_resolve_against_cwd(tmp_path: Path, monkeypatch) -> None:
    cfg_file = write_yaml(tmp_path / "c.yaml", BASE)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file, ["epochs=5", "lr=0.5", "use_gpu=true", "name=other", "shards_dir=s"])
    assert (cfg.epochs, cfg.lr, cfg.use_gpu, cfg.name) == (5, 0.5, True, "other")
    assert cfg.shards_dir == str(tmp_path / "s") and cfg.run_dir == str(tmp_path / "runs" / "other")
    assert parse_overrides(["a=1", "b=x=y", "c="]) == {"a": 1, "b": "x=y", "c": ""}


def test_uris_stay_uris_and_the_run_directory_joins_with_a_slash(tmp_path: Path) -> None:
    cfg_file = write_yaml(tmp_path / "c.yaml", BASE)
    cfg = load_config(cfg_file, ["storage_path=s3://b/runs/", "shards_dir=s3://b/shards", "cache_dir=none",
                                 "cache_max_gb=20"])
    assert (cfg.storage_path, cfg.run_dir, cfg.shards_dir) == ("s3://b/runs", "s3://b/runs/t", "s3://b/shards")
    assert (cfg.cache_dir, cfg.cache_max_gb) == ("none", 20.0)
    assert load_config(cfg_file, ["storage_path=s3://b"]).run_dir == "s3://b/t"
    with pytest.raises(ValueError, match="cache_max_gb: must be >= 0"):
        load_config(cfg_file, ["cache_max_gb=-1"])


@pytest.mark.parametrize("values, overrides, message", [
    ({**BASE, "learning_rate": 0.1}, [], "unknown key(s) learning_rate; valid keys: name, storage_path"),
    (BASE, ["epoch=3"], "unknown key(s) epoch"),
    ({k: v for k, v in BASE.items() if k != "model"}, [], "missing key(s) model"),
    (BASE, ["epochs=two"], "epochs: expected int, got 'two'"),
    (BASE, ["use_gpu=1"], "use_gpu: expected bool"),
    (BASE, ["crop=center"], "crop: 'center' is not one of paper, rrc"),
    (BASE, ["workers=0"], "workers: must be >= 1"),
    (BASE, ["workers=[2, 1]"], "workers: must be an int or [min, max] with 1 <= min <= max, got [2, 1]"),
    (BASE, ["workers=[0, 2]"], "workers: must be an int or [min, max] with 1 <= min <= max, got [0, 2]"),
    (BASE, ["workers=[1, 2, 3]"], "workers: must be an int or [min, max] with 1 <= min <= max, got [1, 2, 3]"),
    (BASE, ["workers=two"], "workers: must be an int or [min, max] with 1 <= min <= max, got 'two'"),
    (BASE, ["epochs=true"], "epochs: expected int, got True"),
    (BASE, ["lr=fast"], "lr: expected float, got 'fast'"),
    (BASE, ["lr=-1e-3"], "lr: must be >= 0, got -1e-3"),
    (BASE, ["model=resnet50"], "model: 'resnet50' is not one of alexnet, alexnet-1gpu"),
    (BASE, ["precision=fp16"], "precision: fp16 (with a GradScaler) is for GPU workers; on CPU use bf16 or fp32"),
    (BASE, ["learing_rate=0.1", "wieght_decay=0"], "unknown key(s) learing_rate, wieght_decay (did you mean "
                                                   "weight_decay?); valid keys:"),
    (BASE, ["epoch=3"], "unknown key(s) epoch (did you mean epochs?)"),
    (BASE, ["dali_threads=many"], "dali_threads: 'many' must be a number or auto"),
    (BASE, ["name=a/b"], "name: 'a/b' must be a plain directory name"),
    (BASE, ["nokey"], "--set 'nokey': expected key=value"),
])
def test_config_errors_are_one_clear_line(tmp_path: Path, values: dict, overrides: list, message: str) -> None:
    cfg_file = write_yaml(tmp_path / "c.yaml", values)
    with pytest.raises(ValueError) as err:
        load_config(cfg_file, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    if "unknown" in message:
        assert all(key in str(err.value) for key in valid_keys())


def test_numbers_are_numbers_however_yaml_typed_them_and_errors_name_the_line(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-3` and `5e-4` as strings (no dot); they are floats wherever a float
    is expected, in the file and in --set. A bad value names its line, bad YAML its column."""
    text = "\n".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in BASE.items())
    (tmp_path / "c.yaml").write_text(text + "\nweight_decay: 5e-4\nmin_lr: 1E-6\n")
    cfg = load_config(tmp_path / "c.yaml", ["lr=1e-3"])
    assert (cfg.lr, cfg.weight_decay, cfg.min_lr) == (0.001, 0.0005, 1e-6)
    (tmp_path / "c.yaml").write_text(text + "\nmomentum: lots\n")
    with pytest.raises(ValueError) as err:
        load_config(tmp_path / "c.yaml")
    assert str(err.value) == f"{tmp_path / 'c.yaml'}:{len(BASE) + 1}: momentum: expected float, got 'lots'"
    (tmp_path / "c.yaml").write_text(text + "\nlr: [0.1\nseed: 3\n")
    with pytest.raises(ValueError) as err:
        load_config(tmp_path / "c.yaml")
    assert re.match(rf"{re.escape(str(tmp_path / 'c.yaml'))}:\d+:\d+: not valid YAML: ", str(err.value)), err.value


def test_help_lists_every_key_with_its_type_default_and_doc_and_flags_get_the_set_hint() -> None:
    shown = subprocess.run([sys.executable, str(ROOT / "orchestration" / "train.py"), "--help"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0
    for key in valid_keys():
        assert re.search(rf"^  {key} +\S", shown.stdout, re.M), key
    assert re.search(r"^  lr +float \(default 0.01\)\n +peak learning rate", shown.stdout, re.M)
    assert re.search(r"^  schedule +constant\|cosine\|plateau\|step \(default 'cosine'\)", shown.stdout, re.M)
    flag = subprocess.run([sys.executable, str(ROOT / "orchestration" / "train.py"), "--config", "configs/demo.yaml",
                           "--epochs", "3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert flag.returncode == 2 and "--epochs 3: config keys are set with --set: --set epochs=3" in flag.stderr
    assert "Traceback" not in flag.stderr


def test_workers_is_an_int_or_an_elastic_min_max(tmp_path: Path) -> None:
    cfg_file = write_yaml(tmp_path / "c.yaml", BASE)
    elastic = load_config(cfg_file, ["workers=[1,4]", "elastic_resize_monitor_interval_s=5"])
    assert (elastic.workers, elastic.elastic, elastic.max_workers) == ((1, 4), True, 4)
    assert elastic.elastic_resize_monitor_interval_s == 5.0
    assert from_dict(elastic.to_dict()) == elastic  # what Ray hands each worker (a tuple) reads back
    assert from_dict(json.loads(json.dumps(elastic.to_dict()))).workers == (1, 4)  # and from JSON (a list)
    fixed = load_config(cfg_file, ["workers=[3, 3]"])
    assert (fixed.workers, fixed.elastic) == (3, False)  # [n, n] is a fixed size


def test_missing_shards_say_to_run_make_shards(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {**BASE, "shards_dir": str(tmp_path / "none")}))
    with pytest.raises(FileNotFoundError, match="run `make shards`"):
        check_shards(cfg)


def test_cli_errors_exit_nonzero_without_traceback(tmp_path: Path) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", {**BASE, "shards_dir": str(tmp_path / "none")})
    for args, message in (([str(tmp_path / "absent.yaml")], "no such config file"),
                          ([str(bad)], "run `make shards`"),
                          ([str(bad), "--set", "batch=3"], "unknown key(s) batch")):
        out = subprocess.run([sys.executable, str(ROOT / "orchestration" / "train.py"), "--config", *args[:1],
                              *args[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert out.returncode != 0
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_checkpoint_file_fixed_keys_complete_and_safe_to_load(tmp_path: Path) -> None:
    """The file rank 0 puts in the folder it hands to Ray (pruning and resume are Ray's:
    tests/e2e/test_resume.py, tests/e2e/test_s3_run.py)."""
    model = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(model)
    model.module = nn.Linear(3, 2)  # a DDP-shaped wrapper: saved keys must carry no `module.`
    opt = torch.optim.SGD(model.module.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    for epoch in (1, 2):  # the second write replaces the first whole
        path = write_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, epoch=epoch,
                                config={"name": "t"})
    assert path == tmp_path / FILE and [p.name for p in tmp_path.iterdir()] == [FILE]  # no temp left
    state = load_checkpoint(path)
    assert tuple(sorted(state)) == tuple(sorted(KEYS)) and state["epoch"] == 2
    assert set(state["model"]) == {"weight", "bias"}
    # a checkpoint that needs code to unpickle is refused (weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({**state, "config": nn.Linear(1, 1)}, evil)
    with pytest.raises(Exception, match="weights_only|Unsupported|not allowed"):
        load_checkpoint(evil)


def test_metrics_resume_keeps_one_row_per_epoch(tmp_path: Path) -> None:
    log = MetricsLog(resolve(tmp_path / "metrics.parquet"))
    for epoch in (1, 2):
        log.log_step(epoch, epoch * 10 - 5, 1.0, 0.1, 100.0, 0.2)
        log.log_epoch(epoch, epoch * 10, 0.9, 0.1, 100.0, 0.2, 0.5, 0.9)
    log.log_step(3, 25, 1.0, 0.1, 100.0, 0.2)  # epoch 3 interrupted
    log.flush()
    # the newest checkpoint: epoch 1's end (step 10)
    resumed = MetricsLog(resolve(tmp_path / "metrics.parquet"), resume_epoch=1, resume_step=10)
    assert {r["epoch"] for r in resumed.rows} == {1}
    # a step checkpoint inside epoch 2 (step 17): the step rows up to it stay, not epoch 2's row
    mid = MetricsLog(resolve(tmp_path / "metrics.parquet"), resume_epoch=1, resume_step=17)
    assert [(r["epoch"], r["step"], r["top1"] is None) for r in mid.rows] == [(1, 5, True), (1, 10, False),
                                                                               (2, 15, True)]
    resumed.log_epoch(2, 20, 0.8, 0.1, 120.0, 0.1, 0.6, 0.95)
    table = pq.read_table(tmp_path / "metrics.parquet")
    assert table.column_names == ["epoch", "step", "loss", "lr", "images_per_s", "data_wait", "top1", "top5",
                                  "skipped_samples", "world_size", "images_per_s_per_worker", "dali_cpu_util",
                                  "mem_anon_mb", "mem_file_mb", "dali_device_mb", "nvjpg_util"]
    assert [r["epoch"] for r in resumed.epoch_rows()] == [1, 2]
    summary = summarize(resumed.epoch_rows(), wall_s=3.0, world_size=2, restarts=1)
    assert summary["top1"] == 0.6 and summary["images_per_s"] == 120.0 and summary["epochs"] == 2
    plot_curves(resumed.epoch_rows(), resolve(tmp_path / "curves.png"), resizes=[(1.4, 2, 1)])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_of_an_older_run_without_the_usage_columns_resume(tmp_path: Path) -> None:
    old = pa.table({"epoch": [1, 1], "step": [5, 10], "loss": [1.0, 0.9], "lr": [0.1, 0.1],
                    "images_per_s": [100.0, 100.0], "data_wait": [0.2, 0.2], "top1": [None, 0.5],
                    "top5": [None, 0.9], "skipped_samples": [None, 0], "world_size": [2, 2]})
    pq.write_table(old, tmp_path / "metrics.parquet")
    log = MetricsLog(resolve(tmp_path / "metrics.parquet"), resume_epoch=1, resume_step=10, world_size=2)
    log.log_step(2, 15, 0.8, 0.1, 120.0, 0.1, dali_cpu_util=0.7, mem_anon_mb=900.0, mem_file_mb=300.0)
    log.log_epoch(2, 20, 0.8, 0.1, 120.0, 0.1, 0.6, 0.95)
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    assert [r["dali_cpu_util"] for r in rows] == [None, None, 0.7, None]
    assert [r["images_per_s_per_worker"] for r in rows] == [None, None, 60.0, 60.0]


def test_decoding_settings_are_numbers_or_auto(tmp_path: Path) -> None:
    cfg_file = write_yaml(tmp_path / "c.yaml", BASE)
    default = load_config(cfg_file)
    assert (default.dali_threads, default.hw_decoder_load) == (0, "auto")
    tuned = load_config(cfg_file, ["dali_threads=auto", "hw_decoder_load=0.9"])
    assert (tuned.dali_threads, tuned.hw_decoder_load) == ("auto", 0.9)
    assert load_config(cfg_file, ["hw_decoder_load=1"]).hw_decoder_load == 1.0
    for bad, message in (("dali_threads=many", "dali_threads: 'many' must be a number or auto"),
                         ("dali_threads=-1", "dali_threads: -1 must be an integer >= 0 or auto"),
                         ("hw_decoder_load=1.5", "hw_decoder_load: 1.5 must be a number in [0, 1] or auto"),
                         ("hw_decoder_load=high", "hw_decoder_load: 'high' must be a number or auto")):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(cfg_file, [bad])


def test_decoding_defaults_per_worker_kind(tmp_path: Path) -> None:
    from orchestration.loaders import decoding_args

    cfg = load_config(write_yaml(tmp_path / "c.yaml", BASE))
    assert decoding_args(cfg, on_gpu=False) == {"num_threads": 1, "hw_decoder_load": None}  # its cores train
    assert decoding_args(cfg, on_gpu=True) == {"num_threads": "auto", "hw_decoder_load": "auto"}
    fixed = load_config(write_yaml(tmp_path / "c.yaml", BASE), ["dali_threads=6", "hw_decoder_load=0.9"])
    assert decoding_args(fixed, on_gpu=True) == {"num_threads": 6, "hw_decoder_load": 0.9}
    torch_ = load_config(write_yaml(tmp_path / "c.yaml", BASE), ["backend=torch", "dali_threads=auto"])
    assert decoding_args(torch_, on_gpu=True) == {"num_threads": 4}  # DataLoader workers: nothing to probe


def test_lr_schedule_is_a_function_of_epochs_as_a_fraction() -> None:
    from orchestration.config import from_dict
    from orchestration.schedule import lr_at, peak_lr

    cfg = from_dict({"name": "t", "storage_path": "/tmp/r", "shards_dir": "/tmp/s", "model": "alexnet", "epochs": 4,
                     "batch_size": 8, "workers": 2, "use_gpu": False, "lr": 0.1, "warmup_epochs": 1.0,
                     "schedule": "cosine", "lr_base_batch": 32})
    assert peak_lr(cfg, 16) == pytest.approx(0.05) and peak_lr(cfg, 64) == pytest.approx(0.2)
    # warm-up: the step that completes the first quarter of epoch 1 trains at a quarter of the peak
    assert lr_at(cfg, 32, 0.0, 0.25) == pytest.approx(0.025)
    assert lr_at(cfg, 32, 0.75, 0.25) == pytest.approx(0.1)  # the step that ends the warm-up
    # cosine over the 3 epochs after it: half-way (epoch 2.5) is half the peak, the end is 0
    assert lr_at(cfg, 32, 2.5, 0.25) == pytest.approx(0.05)
    assert lr_at(cfg, 32, 4.0, 0.25) == pytest.approx(0.0, abs=1e-12)
    # the same point of the curve with another shape: only the peak follows the global batch
    assert lr_at(cfg, 16, 2.5, 0.125) == pytest.approx(0.025)
