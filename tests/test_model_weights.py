"""torchvision compatibility and `load_weights`: round trips, prefixes, refusals."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from model import build_model, load_weights

# torchvision.models.alexnet().state_dict(): every key and shape, in order (torchvision
# itself does not import beside this project's torch, so the facts are written out).
TORCHVISION_ALEXNET = [
    ("features.0.weight", (64, 3, 11, 11)),
    ("features.0.bias", (64,)),
    ("features.3.weight", (192, 64, 5, 5)),
    ("features.3.bias", (192,)),
    ("features.6.weight", (384, 192, 3, 3)),
    ("features.6.bias", (384,)),
    ("features.8.weight", (256, 384, 3, 3)),
    ("features.8.bias", (256,)),
    ("features.10.weight", (256, 256, 3, 3)),
    ("features.10.bias", (256,)),
    ("classifier.1.weight", (4096, 9216)),
    ("classifier.1.bias", (4096,)),
    ("classifier.4.weight", (4096, 4096)),
    ("classifier.4.bias", (4096,)),
    ("classifier.6.weight", (1000, 4096)),
    ("classifier.6.bias", (1000,)),
]


@pytest.fixture(scope="module")
def tv() -> nn.Module:
    torch.manual_seed(0)
    return build_model("alexnet-torchvision").eval()


def test_torchvision_state_dict_keys_and_shapes(tv: nn.Module) -> None:
    assert [(k, tuple(v.shape)) for k, v in tv.state_dict().items()] == TORCHVISION_ALEXNET


def test_torchvision_layout_modules(tv: nn.Module) -> None:
    assert isinstance(tv.avgpool, nn.AdaptiveAvgPool2d) and tv.avgpool.output_size == 6
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in tv.modules())
    assert [type(m).__name__ for m in tv.classifier] == [
        "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]


def test_torchvision_checkpoint_loads_strict(tmp_path: Path, tv: nn.Module) -> None:
    # a checkpoint built only from the fact list, as torchvision would save it
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(shape, generator=gen) * 0.01 for k, shape in TORCHVISION_ALEXNET}
    path = tmp_path / "alexnet-owt.pth"
    torch.save(state, path)
    model = load_weights(build_model("alexnet-torchvision"), path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_round_trip_of_a_compiled_models_checkpoint(tmp_path: Path, tv: nn.Module) -> None:
    # torch.compile's wrapper prefixes every key with `_orig_mod.`; DDP's with `module.`
    state = {f"module._orig_mod.{k}": v for k, v in tv.state_dict().items()}
    torch.save({"model": state, "epoch": 3, "optimizer": {}}, tmp_path / "ckpt.pt")
    torch.manual_seed(99)
    fresh = build_model("alexnet-torchvision").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), tv(x))
        load_weights(fresh, tmp_path / "ckpt.pt")
        torch.testing.assert_close(fresh(x), tv(x))


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "module.", "_orig_mod.", "module._orig_mod."])
def test_checkpoint_shapes_accepted(tmp_path: Path, wrap: str) -> None:
    # the same logic as above on a small real network, so each shape costs milliseconds
    src = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    src(torch.randn(2, 3, 8, 8))
    state = src.state_dict()
    if wrap.endswith("."):
        state = {wrap + k: v for k, v in state.items()}
    obj = {"model": state, "epoch": 1} if wrap == "model" else state
    obj = {"state_dict": state, "step": 7} if wrap == "state_dict" else obj
    torch.save(obj, tmp_path / "small.pt")
    dst = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    load_weights(dst, tmp_path / "small.pt")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_round_trip_bn_keeps_running_stats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_model("alexnet-bn", num_classes=10)
    src.train()
    with torch.no_grad():
        src(torch.randn(4, 3, 64, 64) * 3 + 1)
    torch.save({"model": src.state_dict()}, tmp_path / "bn.pt")
    dst = load_weights(build_model("alexnet-bn", num_classes=10), tmp_path / "bn.pt")
    assert torch.equal(dst.norm1.running_mean, src.norm1.running_mean)
    assert dst.norm1.num_batches_tracked.item() == 1


def one_line_error(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_mismatch_names_the_keys_in_one_line(tmp_path: Path, tv: nn.Module) -> None:
    path = tmp_path / "paper.pt"
    paper = nn.Module()
    paper.conv1 = nn.Conv2d(3, 96, 11, stride=4, padding=2)  # the paper model's first keys
    torch.save(paper.state_dict(), path)
    with pytest.raises(ValueError) as err:
        load_weights(tv, path)
    msg = one_line_error(err)
    assert "missing: classifier.1.bias, classifier.1.weight" in msg and "(+11 more)" in msg
    assert "unexpected: conv1.bias, conv1.weight" in msg


def test_shape_mismatch_names_the_key(tmp_path: Path, tv: nn.Module) -> None:
    path = tmp_path / "tv10.pt"
    state = dict(tv.state_dict())
    state["classifier.6.weight"] = state["classifier.6.weight"][:10]
    state["classifier.6.bias"] = state["classifier.6.bias"][:10]
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_weights(tv, path)
    msg = one_line_error(err)
    assert "classifier.6.weight (10, 4096) vs (1000, 4096)" in msg and "missing" not in msg


def test_missing_file_and_non_state_dict(tmp_path: Path, tv: nn.Module) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(tv, tmp_path / "nope.pt")
    torch.save({"epoch": 1, "model": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_weights(tv, tmp_path / "odd.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError) as err:
        load_weights(tv, tmp_path / "junk.pt")
    one_line_error(err)


class RunsCode:
    """Unpickling this calls os.system: the attack weights_only=True must stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_refuses_a_pickle_that_would_run_code(tmp_path: Path, tv: nn.Module) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"extra": RunsCode(marker), "model": tv.state_dict()}, path)
    with pytest.raises(ValueError) as err:
        load_weights(tv, path)
    msg = one_line_error(err)
    assert "evil.pt" in msg and "refused" in msg
    assert not marker.exists()
    # the file really is dangerous: plain unpickling of its data.pkl runs the command (it
    # comes before the tensors, whose storage references plain pickle then cannot resolve)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)
    assert marker.exists()
