"""`python -m model summary`: the layer table against ALEXNET.md's figures."""
from __future__ import annotations

import pytest

from model import build_model
from model.__main__ import main
from model.summary import summarize


def test_paper_table_at_224() -> None:
    rows = {r.name: r for r in summarize(build_model("alexnet"), 224)}
    assert rows["conv1"].output_shape == (96, 55, 55) and rows["conv1"].params == 34_944
    assert rows["pool1"].output_shape == (96, 27, 27)
    assert rows["conv2"].output_shape == (256, 27, 27) and rows["conv2"].params == 307_456
    assert rows["pool2"].output_shape == (256, 13, 13)
    assert rows["conv3"].output_shape == (384, 13, 13)
    assert rows["conv5"].output_shape == (256, 13, 13)
    assert rows["pool5"].output_shape == (256, 6, 6)
    assert rows["fc8"].output_shape == (1000,)
    assert sum(r.params for r in rows.values()) == 60_965_224
    # conv2 in two groups: 27*27*256 outputs, each 48*5*5 multiply-accumulates
    assert rows["conv2"].macs == 27 * 27 * 256 * 48 * 25
    assert sum(r.macs for r in rows.values()) == 724_406_816


def test_torchvision_macs_match_its_published_071_gflops() -> None:
    rows = summarize(build_model("alexnet-torchvision"), 224)
    assert sum(r.macs for r in rows) == 714_188_480  # torchvision lists 0.71 GFLOPS (MACs)


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "alexnet-bn", "--crop", "64", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "alexnet-bn at 64x64" in out and "norm6" in out
    total = out.strip().splitlines()[-1].split()
    assert total[0] == "total" and total[1] == f"{sum(p.numel() for p in build_model('alexnet-bn', 10).parameters()):,}"


def test_cli_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["summary", "alexnet", "--crop", "32"])
    assert exc.value.code == 2
    assert "--crop must be at least 63" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["summary", "vgg16"])
    assert "invalid choice: 'vgg16'" in capsys.readouterr().err
