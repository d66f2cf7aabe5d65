"""`python -m model export` and the resolver after training (orchestration/artifacts.py).

A real checkpoint of a briefly trained `alexnet-tiny` (10 classes, crop 64; BatchNorm running
statistics and SGD momentum filled in by a few steps) is written with training's own
`write_checkpoint`, into a folder laid out like a run: `epoch-0001/`, `epoch-0002/` and Ray's
record of them. Each export is judged by the logits it gives against the checkpoint's own
model: weights and TorchScript on torch, ONNX on onnxruntime, at the run's crop, the demo
crop and 224.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from model import build_model, load_weights
from model.__main__ import main
from model.alexnet import MIN_CROP, AlexNet, AlexNetConfig
from model.export import FixedPool, load_exported, read_checkpoint, save_onnx, with_fixed_pool
from model.registry import MODEL_NAMES
from orchestration.artifacts import build_trained_model, load_trained
from orchestration.checkpoint import FILE, write_checkpoint
from orchestration.config import from_dict

ROOT = Path(__file__).resolve().parents[1]
CLASSES, CROP = 10, 64
DEMO_CROP = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["crop_size"]


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = build_model("alexnet-tiny", CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    for _ in range(3):
        x, y = torch.randn(8, 3, CROP, CROP), torch.randint(0, CLASSES, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _snapshot(names: list[str]) -> dict:
    """Ray Train's record of the kept checkpoints (checkpoint_manager_snapshot.json, as Ray 2.60 writes it)."""
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"epoch": i + 1}} for i, n in enumerate(names)]
    return {"ray_version": "2.60.0", "checkpoint_results": results,
            "checkpoint_report_indices": list(range(len(names))),
            "latest_checkpoint_result": results[-1] if results else None, "pending_training_results": [],
            "pending_validation_specs": [], "current_report_index": len(names), "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of two epoch checkpoints (different weights) and Ray's record of both."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    config = from_dict({"name": "tiny", "storage_path": str(run.parent), "shards_dir": str(run.parent / "shards"),
                        "model": "alexnet-tiny", "epochs": 2, "batch_size": 8, "workers": 1, "use_gpu": False,
                        "crop_size": CROP}).to_dict()
    for epoch in (1, 2):
        model, optimizer, scheduler = _trained(seed=epoch)
        folder = run / f"epoch-{epoch:04d}"
        folder.mkdir(parents=True)
        write_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, config=config)
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(_snapshot(["epoch-0001", "epoch-0002"])))
    return run


@pytest.fixture(scope="module")
def source(run_dir: Path) -> nn.Module:
    """The newest checkpoint's network, as evaluate and predict build it."""
    _, state = load_trained(str(run_dir))
    return build_trained_model(state)


def images(n: int, crop: int) -> torch.Tensor:
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(crop))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def export(target: Path, out: Path, fmt: str, *extra: str) -> None:
    assert main(["export", str(target), "--out", str(out), "--format", fmt, *extra]) == 0
    assert out.is_file()


# ------------------------------------------------------------------- finding the checkpoint
def test_a_run_directory_means_its_newest_registered_checkpoint(run_dir: Path) -> None:
    newest = run_dir / "epoch-0002" / FILE
    for target in (run_dir, run_dir / "epoch-0002", newest):
        where, state = load_trained(str(target))
        assert where == str(newest) and state["epoch"] == 2
        assert read_checkpoint(target)[0] == newest  # the model CLI's local reading agrees
    where, state = load_trained(str(run_dir / "epoch-0001"))
    assert where == str(run_dir / "epoch-0001" / FILE) and state["epoch"] == 1
    model = build_trained_model(state)
    assert not model.training and model.fc8.out_features == CLASSES
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def test_ray_record_decides_which_checkpoint_is_newest(run_dir: Path, tmp_path: Path) -> None:
    """A folder that Ray never registered (say a copy cut short) is not taken for the newest."""
    run = tmp_path / "run"
    for name in ("epoch-0001", "epoch-0002"):
        (run / name).mkdir(parents=True)
        (run / name / FILE).write_bytes((run_dir / name / FILE).read_bytes())
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(_snapshot(["epoch-0001"])))
    assert load_trained(str(run))[0] == str(run / "epoch-0001" / FILE)


def test_one_line_errors_name_the_path_and_what_to_do(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope: no such run directory or checkpoint; name"):
        load_trained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"neither a run directory .* nor a checkpoint folder"):
        load_trained(str(tmp_path))
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "checkpoint_manager_snapshot.json").write_text(json.dumps(_snapshot([])))
    with pytest.raises(FileNotFoundError, match=r"fresh: Ray's record of this run holds no checkpoint yet"):
        load_trained(str(empty))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.txt: not a training checkpoint \(torch.load"):
        load_trained(str(text))
    weights = tmp_path / "w.pt"
    torch.save({"fc8.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ValueError, match=r"w.pt: not a training checkpoint \(keys"):
        load_trained(str(weights))
    for err in (FileNotFoundError, ValueError):
        with pytest.raises(err) as info:
            load_trained(str(tmp_path / "nope") if err is FileNotFoundError else str(text))
        assert "\n" not in str(info.value)


def test_a_checkpoint_on_object_storage(run_dir: Path, s3_bucket: str) -> None:
    from shards.location import resolve

    run = resolve(f"{s3_bucket}/runs/tiny")
    for name in ("epoch-0001", "epoch-0002"):
        (run / name / FILE).write_bytes((run_dir / name / FILE).read_bytes())
    (run / "checkpoint_manager_snapshot.json").write_bytes((run_dir / "checkpoint_manager_snapshot.json").read_bytes())
    where, state = load_trained(run.uri)
    assert where == f"{s3_bucket}/runs/tiny/epoch-0002/{FILE}" and state["epoch"] == 2


def test_the_cli_says_what_is_wrong_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and err.count("\n") == 1
    assert main(["export", "s3://bucket/runs/demo", "--out", str(tmp_path / "w.pt")]) == 2
    assert "reads a local checkpoint; copy it here first" in capsys.readouterr().err
    assert not (tmp_path / "w.pt").exists()
    with pytest.raises(SystemExit):  # weights keep the crop the run trained at
        main(["export", str(tmp_path), "--out", str(tmp_path / "w.pt"), "--crop", "224"])
    assert "--crop applies to --format onnx only" in capsys.readouterr().err


# ------------------------------------------------------------------------------- weights
def test_weights_file_is_the_state_dict_with_what_rebuilds_it(run_dir: Path, source: nn.Module,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "tiny.pt"
    export(run_dir, out, "weights")
    checkpoint = run_dir / "epoch-0002" / FILE
    assert out.stat().st_size < 0.6 * checkpoint.stat().st_size  # no optimizer momentum, no RNG state
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert {k: raw[k] for k in ("format", "model", "num_classes", "crop_size", "epoch")} == {
        "format": "alexnet-weights/1", "model": "alexnet-tiny", "num_classes": CLASSES, "crop_size": CROP, "epoch": 2}
    assert raw["source"] == str(checkpoint)
    assert raw["state_dict"].keys() == source.state_dict().keys()
    model, meta = load_exported(out)
    assert meta["model"] == "alexnet-tiny" and not model.training
    x = images(4, CROP)
    assert torch.equal(logits(model, x), logits(source, x))
    plain = load_weights(build_model("alexnet-tiny", CLASSES), out).eval()  # the project's loader takes it too
    assert torch.equal(logits(plain, x), logits(source, x))


# --------------------------------------------------------------------------- torchscript
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_variant_scripts_with_the_same_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, CLASSES).eval()
    scripted = torch.jit.script(model)
    x = images(2, 96)
    assert torch.equal(logits(scripted, x), logits(model, x))
    with pytest.raises(Exception, match=f"at least {MIN_CROP}x{MIN_CROP}, got \\(40, 70\\)"):
        scripted(torch.randn(1, 3, 40, 70))


def test_torchscript_export_runs_without_this_code(run_dir: Path, source: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "tiny.ts"
    export(run_dir, out, "torchscript")
    loaded = torch.jit.load(str(out))
    for crop in (CROP, DEMO_CROP, 224):  # scripted, not traced: any crop
        x = images(3, crop)
        assert torch.equal(logits(loaded, x), logits(source, x)), crop


# ---------------------------------------------------------------------------------- onnx
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 13])
def test_fixed_pool_is_the_adaptive_pool(size: int) -> None:
    x = torch.randn(2, 5, size, size + 1)
    ours, torchs = FixedPool(size, size + 1, 6)(x), nn.AdaptiveAvgPool2d(6)(x)
    if 6 % size == 0 and 6 % (size + 1) == 0:  # upsampling (small crops) and identity: bit for bit
        assert torch.equal(ours, torchs)
    torch.testing.assert_close(ours, torchs, rtol=1e-6, atol=1e-6)


def test_fixed_pool_keeps_the_logits_at_the_demo_crop(source: nn.Module) -> None:
    x = images(3, DEMO_CROP)
    assert torch.equal(logits(with_fixed_pool(source, DEMO_CROP), x), logits(source, x))


def _onnx_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


@pytest.fixture()
def onnx_extra() -> None:
    for name in ("onnxscript", "onnx", "onnxruntime"):
        pytest.importorskip(name, reason="the export extra is not installed: pip install -e '.[export]'")


@pytest.mark.parametrize("crop", [None, DEMO_CROP, 224])
def test_onnx_export_gives_the_logits_on_onnxruntime(onnx_extra, run_dir: Path, source: nn.Module, tmp_path: Path,
                                                     crop: int | None) -> None:
    """At the run's crop (64: the 1x1 map goes to 6x6), the demo crop (2x2 -> 6x6) and 224 (6x6),
    with another batch size than the export's example (the batch is dynamic)."""
    out = tmp_path / "tiny.onnx"
    export(run_dir, out, "onnx", *([] if crop is None else ["--crop", str(crop)]))
    x = images(3, crop or CROP)
    torch.testing.assert_close(_onnx_logits(out, x), logits(source, x), rtol=1e-4, atol=1e-5)


def test_onnx_export_of_the_paper_layout(onnx_extra, tmp_path: Path) -> None:
    """LRN and two towers (grouped convs): the layers of `alexnet` at 1/16 width."""
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=CLASSES, groups=2, norm="lrn", init="kaiming", width=1 / 16)).eval()
    out = tmp_path / "lrn.onnx"
    save_onnx(model, out, DEMO_CROP)
    x = images(2, DEMO_CROP)
    torch.testing.assert_close(_onnx_logits(out, x), logits(model, x), rtol=1e-4, atol=1e-5)
