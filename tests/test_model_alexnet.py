"""AlexNet variants against the paper's facts (shared/ALEXNET.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model import MODEL_NAMES, build_model
from model.alexnet import LRN_ALPHA, LRN_BETA, LRN_K, LRN_N, MIN_CROP, AlexNet, AlexNetConfig, paper_lrn

PARAMS = {
    "alexnet": 60_965_224,
    "alexnet-1gpu": 62_378_344,
    "alexnet-torchvision": 61_100_840,
    # the paper's layout plus BN scale and shift for 96+256+384+384+256 conv channels and
    # 4096+4096 fc6/fc7 units, less the biases BN makes redundant: 60,965,224 + 9568
    "alexnet-bn": 60_974_792,
    # alexnet-bn at 1/16 width: convs 6-16-24-24-16, fc6/fc7 256 units, fc8 256 -> 1000
    "alexnet-tiny": 482_342,
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name) for name in MODEL_NAMES}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names_every_variant() -> None:
    assert set(MODEL_NAMES) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_exact_parameter_count(models: dict[str, nn.Module], name: str) -> None:
    assert n_params(models[name]) == PARAMS[name]


def test_unknown_name_is_one_line_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        build_model("alexnet2")
    msg = str(err.value)
    assert "\n" not in msg and "alexnet2" in msg
    assert all(name in msg for name in MODEL_NAMES)


def test_num_classes_sizes_fc8_only() -> None:
    model = build_model("alexnet", num_classes=10)
    assert model.fc8.weight.shape == (10, 4096)
    assert n_params(model) == PARAMS["alexnet"] - 990 * 4097
    with pytest.raises(ValueError, match="num_classes"):
        build_model("alexnet", num_classes=0)


@pytest.mark.parametrize("crop", [224, 112, 64])
def test_output_shapes(models: dict[str, nn.Module], crop: int) -> None:
    x = torch.randn(2, 3, crop, crop)
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            assert model(x).shape == (2, 1000), name


def test_paper_feature_map_sizes_at_224(models: dict[str, nn.Module]) -> None:
    m = models["alexnet"].eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        c1 = m.conv1(x)
        p1 = m.pool1(c1)
        p2 = m.pool2(m.conv2(p1))
        c5 = m.conv5(m.conv4(m.conv3(p2)))
        p5 = m.pool5(c5)
    assert c1.shape[1:] == (96, 55, 55)
    assert p1.shape[1:] == (96, 27, 27)
    assert p2.shape[1:] == (256, 13, 13)
    assert c5.shape[1:] == (256, 13, 13)
    assert p5.shape[1:] == (256, 6, 6)


def test_too_small_input_is_refused_clearly(models: dict[str, nn.Module]) -> None:
    with pytest.raises(ValueError, match=str(MIN_CROP)):
        models["alexnet"](torch.randn(1, 3, MIN_CROP - 1, MIN_CROP - 1))
    models["alexnet"].eval()(torch.randn(1, 3, MIN_CROP, MIN_CROP))


def test_groups_give_the_paper_weight_shapes(models: dict[str, nn.Module]) -> None:
    two, one = models["alexnet"], models["alexnet-1gpu"]
    assert two.conv1.weight.shape == (96, 3, 11, 11)
    assert two.conv2.weight.shape == (256, 48, 5, 5)
    assert two.conv3.weight.shape == (384, 256, 3, 3)  # conv3 sees both towers
    assert two.conv4.weight.shape == (384, 192, 3, 3)
    assert two.conv5.weight.shape == (256, 192, 3, 3)
    assert two.fc6.weight.shape == (4096, 9216)
    assert one.conv2.weight.shape == (256, 96, 5, 5)
    assert one.conv4.weight.shape == (384, 384, 3, 3)
    assert one.conv5.weight.shape == (256, 384, 3, 3)


def test_groups_do_not_mix_towers() -> None:
    conv2 = build_model("alexnet").conv2
    x = torch.randn(1, 96, 9, 9)
    y = torch.randn(1, 96, 9, 9)
    y[:, :48] = x[:, :48]  # same first tower input, different second tower input
    with torch.no_grad():
        assert torch.equal(conv2(x)[:, :128], conv2(y)[:, :128])
        assert not torch.allclose(conv2(x)[:, 128:], conv2(y)[:, 128:])


def paper_lrn_reference(a: torch.Tensor, k: float, n: int, alpha: float, beta: float) -> torch.Tensor:
    """The paper's formula, term by term: sum over j = max(0, i-n/2) .. min(N-1, i+n/2)."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        s = (a[:, lo:hi + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


def test_lrn_matches_the_paper_formula_including_channel_edges() -> None:
    torch.manual_seed(1)
    # large activations so the alpha term matters (with |a| ~ 1 the layer is nearly k^-beta * a)
    a = torch.randn(2, 11, 4, 4, dtype=torch.float64) * 30
    got = paper_lrn()(a)
    want = paper_lrn_reference(a, LRN_K, LRN_N, LRN_ALPHA, LRN_BETA)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and the unmapped torch layer (alpha not multiplied by n) would differ
    naive = nn.LocalResponseNorm(LRN_N, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)(a)
    assert not torch.allclose(naive, want, rtol=1e-3)


def test_lrn_sits_after_conv1_and_conv2_only(models: dict[str, nn.Module]) -> None:
    m = models["alexnet"]
    lrns = [name for name, mod in m.named_modules() if isinstance(mod, nn.LocalResponseNorm)]
    assert lrns == ["norm1", "norm2"]
    assert (m.norm1.size, m.norm1.alpha, m.norm1.beta, m.norm1.k) == (5, 5e-4, 0.75, 2.0)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())


def test_overlapping_pools_and_dropout(models: dict[str, nn.Module]) -> None:
    m = models["alexnet"]
    for pool in (m.pool1, m.pool2, m.pool5):
        assert (pool.kernel_size, pool.stride) == (3, 2)
    assert m.drop6.p == m.drop7.p == 0.5


@pytest.mark.parametrize("name", ["alexnet", "alexnet-1gpu"])
def test_paper_initialisation(models: dict[str, nn.Module], name: str) -> None:
    m = models[name]
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        w = getattr(m, layer).weight
        assert abs(w.mean().item()) < 1e-3, layer
        assert w.std().item() == pytest.approx(0.01, rel=0.05 if w.numel() > 30_000 else 0.1), layer
        bias = getattr(m, layer).bias
        want = 1.0 if layer in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.all(bias == want), layer


def test_bn_variant_layout_and_init(models: dict[str, nn.Module]) -> None:
    m = models["alexnet-bn"]
    bns = [name for name, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bns == ["norm1", "norm2", "norm3", "norm4", "norm5"]
    assert not any(isinstance(mod, nn.LocalResponseNorm) for mod in m.modules())
    assert m.conv2.weight.shape == (256, 48, 5, 5)
    for i in range(1, 6):
        conv, bn = getattr(m, f"conv{i}"), getattr(m, f"norm{i}")
        assert conv.bias is None
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    assert isinstance(m.norm6, nn.BatchNorm1d) and isinstance(m.norm7, nn.BatchNorm1d)
    assert m.fc6.bias is None and m.fc7.bias is None and torch.all(m.fc8.bias == 0)
    assert m.fc6.weight.std().item() == pytest.approx((2 / 9216) ** 0.5, rel=0.05)
    assert m.fc8.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="groups"):
        AlexNetConfig(groups=3)
    with pytest.raises(ValueError, match="norm"):
        AlexNetConfig(norm="ln")  # type: ignore[arg-type]
    assert isinstance(AlexNet(AlexNetConfig(num_classes=5)), nn.Module)


def test_width_scales_every_layer_and_keeps_the_groups_whole() -> None:
    tiny = build_model("alexnet-tiny", num_classes=10)
    assert [tiny.conv1.out_channels, tiny.conv2.out_channels, tiny.conv3.out_channels, tiny.conv4.out_channels,
            tiny.conv5.out_channels, tiny.fc6.out_features, tiny.fc7.out_features] == [6, 16, 24, 24, 16, 256, 256]
    assert tiny.conv2.groups == 2 and tiny.fc6.in_features == 16 * 6 * 6
    with pytest.raises(ValueError, match="width"):
        AlexNetConfig(width=1 / 96)  # conv1's one channel cannot be split into two towers
