"""The GPU graphs against the CPU graphs on the same shards (the `demo_shards` fixture,
stored at shorter side 64, read at crop 56), and a Ray GPU worker's device mapping.

Every test here needs a CUDA GPU and DALI's CUDA build: skipped elsewhere, run by
`make gpu-check` on a lent GPU machine. Both decoders upsample chroma the same way (the GPU
one with `jpeg_fancy_upsampling=True`, pipeline.dali._decoder; libjpeg-turbo's default on the
CPU); what is left is the IDCT's and the colour conversion's rounding (nvJPEG's against
libjpeg-turbo's integer IDCT), a level or so out of 255 on some pixels, so pixels are compared
within `LEVELS` levels (see there); keys and labels exactly.
Train: the reader's shuffle and the random crops/flips are not promised to draw the same on
both devices, so each epoch's key set is compared, its per-channel statistics within the
spread of two draws, and the GPU graph against itself for the same seed (what a resumed run
relies on).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import make_loader

CROP, BATCH, SEED = 56, 16, 3
TRAIN, VAL = 240, 50  # the demo_shards fixture
# CPU against GPU decoding of the same pixels, in levels of 255 (one level is 1 / (255 x std)
# once normalised: about 0.015 on the demo set's stats): with fancy upsampling on both sides
# the difference left is rounding in the IDCT and the YCbCr->RGB conversion, +-1 level on some
# pixels, unbiased. DALI's own test of the mixed decoder with jpeg_fancy_upsampling=True
# against its CPU decoder (dali/test/python/decoder/test_image.py, test_fancy_upsampling)
# holds the mean |difference| to 1 level (and 4 levels without fancy upsampling, its
# consistency test); so here: a batch's mean |difference| at most 1 level per channel, and no
# image shifted as a whole (its mean signed difference) by more than 1 level (a colour-matrix or
# range mismatch moves whole images by several). The old bounds (0.1 and 0.05 normalised, 6.5
# and 3 levels) compared DALI's default GPU upsampling with the CPU's fancy one. NOT MEASURED ON
# A GPU YET (the project's machine has none): the test prints the measured figures, which
# make gpu-check's log carries.
LEVELS = 1.0
# Train epochs drawn on the two devices are two independent draws of crops, flips and lighting:
# on the CPU, 8 seeds of each train graph here differed pairwise by at most 0.0135 in a
# channel's epoch mean and 0.0095 in its std (rrc with lighting, the widest; paper without
# lighting: 0.004 / 0.002). Bounds of about 3x that, plus a level for the decoders.
TRAIN_MEAN_TOL, TRAIN_STD_TOL = 0.05, 0.04

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")]


@pytest.fixture(scope="module")
def manifest(demo_shards) -> list[dict]:
    return pq.read_table(demo_shards / "manifest.parquet", columns=["key", "split", "label"]).to_pylist()


@pytest.fixture(scope="module")
def truth(manifest) -> dict[str, int]:
    """key -> label, from the manifest the packer wrote."""
    return {r["key"]: r["label"] for r in manifest}


@pytest.fixture(scope="module")
def bounds(demo_shards) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: the normalised values of pixel 0 and 255, and the most PCA lighting may
    shift them (5 sigma of alpha on every eigenvalue), from the set's stats.json."""
    stats = json.loads((demo_shards / "stats.json").read_text())
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    shift = 5 * 0.1 * sum(stats["eigval"]) / std
    return -mean / std, (1 - mean) / std, shift


@pytest.fixture(scope="module")
def level(demo_shards) -> torch.Tensor:
    """One level of 255 per channel, once normalised: 1 / (255 x std)."""
    return 1 / (255 * torch.tensor(json.loads((demo_shards / "stats.json").read_text())["std"]))


def loader(shards: Path, split: str, device: str, **kw):
    return make_loader(shards, split, batch_size=BATCH, device=device, crop_size=CROP, seed=SEED,
                       num_threads=2, return_keys=True, **kw)


def one_epoch(ld) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return [(images, labels, keys) for images, labels, keys in ld]


def check_batch(images: torch.Tensor, labels: torch.Tensor, keys: list[str], device: str, truth: dict,
                bounds, views: int | None = None, lit: bool = False) -> None:
    lo, hi, shift = bounds
    n = len(keys)
    assert images.shape == ((n, views, 3, CROP, CROP) if views else (n, 3, CROP, CROP))
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and labels.shape == (n,)
    assert images.device.type == device and labels.device.type == device, (images.device, labels.device)
    assert labels.tolist() == [truth[k] for k in keys]
    per_channel = images.transpose(0, -3).reshape(3, -1).float().cpu()
    slack = shift if lit else torch.full((3,), 0.02)
    assert (per_channel.min(1).values >= lo - slack).all() and (per_channel.max(1).values <= hi + slack).all()
    assert per_channel.std(1).min() > 0.1, "images must carry their pixels, not a constant"


@pytest.mark.parametrize("ten_crop", [False, True], ids=["val", "ten-crop"])
def test_val_graphs_match_cpu(demo_shards, truth, bounds, level, ten_crop):
    cpu = one_epoch(loader(demo_shards, "val", "cpu", ten_crop=ten_crop))
    gpu = one_epoch(loader(demo_shards, "val", "cuda", ten_crop=ten_crop))
    assert [k for _, _, ks in gpu for k in ks] == [k for _, _, ks in cpu for k in ks]  # same order
    assert sum(len(ks) for _, _, ks in gpu) == VAL
    worst_mean, worst_shift = torch.zeros(3), torch.zeros(3)  # in levels, per channel
    for (gi, gl, gk), (ci, cl, _) in zip(gpu, cpu):
        check_batch(gi, gl, gk, "cuda", truth, bounds, views=10 if ten_crop else None)
        assert torch.equal(gl.cpu(), cl)
        diff = (gi.cpu() - ci).transpose(0, -3).flatten(1)  # [3, everything of the batch]
        per_image = (gi.cpu() - ci).transpose(0, -3).flatten(3 if ten_crop else 2)  # [3, (views,) images, pixels]
        mean_abs = diff.abs().mean(1) / level
        shift = per_image.mean(-1).abs().flatten(1).max(1).values / level
        worst_mean, worst_shift = torch.maximum(worst_mean, mean_abs), torch.maximum(worst_shift, shift)
    print(f"\nCPU vs GPU ({'ten-crop' if ten_crop else 'val'}), levels of 255 per channel: batch mean |diff| "
          f"at most {[round(x, 3) for x in worst_mean.tolist()]}, image shift at most "
          f"{[round(x, 3) for x in worst_shift.tolist()]}")
    assert (worst_mean <= LEVELS).all(), "nvJPEG and libjpeg-turbo (both fancy upsampling) differ by rounding, a level"
    assert (worst_shift <= LEVELS).all(), "no image is shifted as a whole"


@pytest.mark.parametrize("crop,lighting", [("rrc", True), ("rrc", False), ("paper", True), ("paper", False)])
def test_train_graphs_match_cpu(demo_shards, manifest, truth, bounds, crop, lighting):
    cpu = one_epoch(loader(demo_shards, "train", "cpu", crop=crop, lighting=lighting))
    gpu = one_epoch(loader(demo_shards, "train", "cuda", crop=crop, lighting=lighting))
    again = one_epoch(loader(demo_shards, "train", "cuda", crop=crop, lighting=lighting))
    assert len(gpu) == len(cpu) == TRAIN // BATCH
    for images, labels, keys in gpu:
        check_batch(images, labels, keys, "cuda", truth, bounds, lit=lighting)
    gpu_keys = [k for _, _, ks in gpu for k in ks]
    train_keys = sorted(r["key"] for r in manifest if r["split"] == "train")
    assert sorted(gpu_keys) == sorted(k for _, _, ks in cpu for k in ks) == train_keys, "every sample once"
    assert gpu_keys != sorted(gpu_keys), "train must be shuffled"
    assert [k for _, _, ks in again for k in ks] == gpu_keys, "the same seed reads the same order on the GPU"
    for (a, _, _), (b, _, _) in zip(gpu, again):
        assert (a - b).abs().max() < 1e-3, "the same seed draws the same crops, flips and lighting on the GPU"
    # the two devices' epochs look alike as a whole: same per-channel statistics within noise
    g = torch.cat([i.cpu() for i, _, _ in gpu]).transpose(0, 1).reshape(3, -1)
    c = torch.cat([i for i, _, _ in cpu]).transpose(0, 1).reshape(3, -1)
    dm, ds = (g.mean(1) - c.mean(1)).abs().max().item(), (g.std(1) - c.std(1)).abs().max().item()
    print(f"\nCPU vs GPU train {crop} lighting={lighting}: epoch mean differs by {dm:.4f}, std by {ds:.4f}")
    assert dm < TRAIN_MEAN_TOL and ds < TRAIN_STD_TOL


def test_next_epoch_reshuffles_on_the_gpu(demo_shards):
    ld = loader(demo_shards, "train", "cuda")
    first, second = ([k for _, _, ks in ld for k in ks] for _ in range(2))
    assert sorted(first) == sorted(second) and first != second


def _device_probe(config: dict) -> None:
    """A Ray Train worker: its torch device, current CUDA device, local rank, and where the
    batches of a loader built as `orchestration.train` builds one land."""
    import os

    import ray.train
    import ray.train.torch

    from pipeline import make_loader as make

    device = ray.train.torch.get_device()
    current = torch.cuda.current_device()
    explicit = make(config["shards"], "val", batch_size=8, device="cuda", crop_size=CROP, num_threads=2,
                    device_id=current)
    images, labels = next(iter(explicit))
    default = make(config["shards"], "val", batch_size=8, device="cuda", crop_size=CROP, num_threads=2)
    default_images, _ = next(iter(default))
    seen = {"torch_device": str(device), "current_device": current,
            "local_rank": ray.train.get_context().get_local_rank(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "images": str(images.device),
            "labels": str(labels.device), "default_images": str(default_images.device)}
    Path(config["out"]).write_text(json.dumps(seen))  # one node: the test reads it back


def test_ray_gpu_worker_trains_on_its_logical_cuda_device(demo_shards, tmp_path):
    """A 1-worker `use_gpu: true` run of orchestration/train.py trains on CUDA (its checkpoint's
    weights were saved from the GPU), and a Ray Train GPU worker's DALI batches land on its
    logical CUDA device, the one Ray Train made current (its local rank)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train")
    import yaml
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestration import train
    from orchestration.checkpoint import FILE

    cfg = {"name": "gpu1", "storage_path": str(tmp_path / "runs"), "shards_dir": str(demo_shards),
           "model": "alexnet-bn", "epochs": 1, "batch_size": 32, "workers": 1, "use_gpu": True,
           "crop_size": CROP, "lr": 0.02, "warmup_epochs": 0.0, "log_every": 2, "max_failures": 0}
    config = tmp_path / "gpu1.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        assert train.main(["--config", str(config)]) == 0
        run = tmp_path / "runs" / "gpu1"
        summary = json.loads((run / "summary.json").read_text())
        assert (summary["world_size"], summary["epochs"]) == (1, 1) and summary["images_per_s"] > 0
        state = torch.load(run / "epoch-0001" / FILE, weights_only=True)  # no map_location: devices as saved
        assert {t.device for t in state["model"].values()} == {torch.device("cuda", 0)}

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
        seen = tmp_path / "probe.json"
        TorchTrainer(_device_probe, train_loop_config={"shards": str(demo_shards), "out": str(seen)},
                     scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
                     run_config=RunConfig(storage_path=str(tmp_path / "probe"), name="probe")).fit()
        m = json.loads(seen.read_text())
        assert m["current_device"] == m["local_rank"] == 0, m
        assert m["torch_device"] == m["images"] == m["labels"] == m["default_images"] == "cuda:0", m
    finally:
        ray.shutdown()
