"""`python -m bench.model` and its forward+backward timer (`step_seconds`, also the GPU check's
model step), on the tiny AlexNet: the table, the JSON, and what each configuration reports.
No timing assertions beyond "positive" (speed goes to the bench)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.model import main, step_seconds
from model import build_model


@pytest.mark.parametrize("dtype,channels_last", [("fp32", False), ("bf16", True)])
def test_step_seconds_times_forward_and_backward(dtype: str, channels_last: bool) -> None:
    net = build_model("alexnet-tiny").train()  # 1000 classes: the timer draws labels in [0, 1000)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    seconds = step_seconds(net, batch=2, crop=64, steps=2, dtype=dtype, channels_last=channels_last, warmup=1)
    assert seconds > 0
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)  # the backward ran


def test_bench_model_writes_the_table_and_the_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.json"
    assert main(["--models", "alexnet-tiny", "--crops", "64", "--batch", "2", "--steps", "1", "--rounds", "1",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {(r["dtype"], r["channels_last"]) for r in results} == {("fp32", False), ("fp32", True),
                                                                   ("bf16", False), ("bf16", True)}
    for r in results:
        assert r["model"] == "alexnet-tiny" and r["crop"] == 64 and r["images_per_s"] > 0
    assert next(r for r in results if r["dtype"] == "fp32" and not r["channels_last"])["vs_fp32_contiguous"] == 1.0
    assert "| alexnet-tiny | 64 | bf16 | on |" in capsys.readouterr().out


def test_bench_model_refuses_an_unknown_model() -> None:
    with pytest.raises(SystemExit):
        main(["--models", "resnet50"])
