"""Encoders and heads: shapes for every registered encoder and pretext mode."""

from __future__ import annotations

import pytest
import torch

from sonossl.models.downstream import PlaneClassifier, SaliencyModel
from sonossl.models.encoder import ENCODERS, build_encoder
from sonossl.models.pretext_heads import PretextModel
from sonossl.pretext.batch import MODES, PretextBatchMaker
from sonossl.pretext.permutations import permutation_set
from sonossl.pretext.transforms import TransformSet


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_embeds_any_frame_size(name):
    enc = build_encoder({"name": name, "width": 8}).eval()
    for side in (32, 48):
        assert enc(torch.rand(2, 1, side, side)).shape == (2, enc.dim)
    assert len(enc.feature_maps(torch.rand(1, 1, 32, 32))) == 4


def test_resnet18_is_torchvision_resnet18_at_width_64():
    enc = build_encoder({"name": "resnet18", "width": 64})
    n = sum(p.numel() for p in enc.parameters())
    assert 11_000_000 < n < 11_300_000  # ResNet-18 without fc, one input channel


@pytest.mark.parametrize("width", [16, 64])
def test_resnet18_initialises_every_convolution_as_torchvision_does_at_any_width(width):
    """Kaiming-normal, fan-out, for ReLU (std sqrt(2 / fan-out)), as torchvision's ResNet: the stages rebuilt for a
    width other than 64 kept PyTorch's default instead, weights 1.7-2.5x smaller."""
    torch.manual_seed(0)
    enc = build_encoder({"name": "resnet18", "width": width})
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20  # the stem, 16 in the blocks, 3 shortcuts
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.15), conv


@pytest.mark.parametrize("width", [16, 64])
def test_resnet18_init_pytorch_keeps_pytorch_s_default_after_the_stem(width):
    """``init: pytorch``: every convolution of the four stages as PyTorch's layer default leaves it
    (kaiming-uniform, a=sqrt(5): std sqrt(1 / (3 fan-in))), at width 64 too, where torchvision re-initialises them;
    the stem stays torchvision's. The spec names the initialisation either way."""
    torch.manual_seed(0)
    enc = build_encoder({"name": "resnet18", "width": width, "init": "pytorch"})
    stem, *convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert float(stem.weight.detach().std()) == pytest.approx((2 / (width * 49)) ** 0.5, rel=0.15)
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.15), conv
    assert enc.spec["init"] == "pytorch"
    assert build_encoder({"name": "resnet18", "width": width}).spec["init"] == "torchvision"  # resnet18's own


def _resnet18_as_built_before(width: int, kaiming_stages: bool) -> list[torch.Tensor]:
    """The stem and stages as ``_resnet18`` built them before ``init`` existed, inline: with ``kaiming_stages``
    a8b5d3e's (torchvision's initialisation in the rebuilt stages), without it the construction before a8b5d3e."""
    import torchvision
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    net = torchvision.models.resnet18(weights=None)
    if width != 64:
        net.inplanes, net.bn1 = width, nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
        if kaiming_stages:
            for m in [*net.layer1.modules(), *net.layer2.modules(), *net.layer3.modules(), *net.layer4.modules()]:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    net.conv1 = nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    parts = [net.conv1, net.bn1, net.layer1, net.layer2, net.layer3, net.layer4]
    return [t for part in parts for t in part.state_dict().values()]


@pytest.mark.parametrize("width,init,kaiming_stages", [(16, None, True), (16, "torchvision", True),
                                                       (64, None, True), (16, "pytorch", False)])
def test_each_init_builds_exactly_the_network_it_names(width, init, kaiming_stages):
    """Bit for bit, and leaving the random generator where the old construction did (the draws after it, heads and
    data, stay the same): the default is the network of a8b5d3e on, ``pytorch`` at width 16 the one before it, so
    every record made with either can be rebuilt."""
    torch.manual_seed(0)
    expected, after = _resnet18_as_built_before(width, kaiming_stages), torch.get_rng_state()
    torch.manual_seed(0)
    enc = build_encoder({"name": "resnet18", "width": width, "init": init})
    got = list(enc.state_dict().values())
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(torch.get_rng_state(), after)


def test_small_cnn_takes_either_initialisation():
    """small_cnn's own is PyTorch's default; ``init: torchvision`` gives its convolutions kaiming-normal fan-out."""
    for init, torchvision_like in (("pytorch", False), (None, False), ("torchvision", True)):
        torch.manual_seed(0)
        enc = build_encoder({"name": "small_cnn", "width": 16, "init": init})
        assert enc.spec["init"] == (init or "pytorch")
        for conv in (m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)):
            k = conv.kernel_size[0] * conv.kernel_size[1]
            fan_out, fan_in = conv.out_channels * k, conv.in_channels * k
            std = (2 / fan_out) ** 0.5 if torchvision_like else (1 / (3 * fan_in)) ** 0.5
            assert float(conv.weight.detach().std()) == pytest.approx(std, rel=0.2), (init, conv)


def test_encoder_init_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"encoder.init='xavier': must be one of \['torchvision', 'pytorch'\]"):
        build_encoder({"name": "resnet18", "width": 8, "init": "xavier"})


def test_unknown_encoder_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18"):
        build_encoder({"name": "vgg"})


@pytest.mark.parametrize("mode", MODES)
def test_pretext_model_outputs_one_logit_set_per_head(mode):
    maker = PretextBatchMaker(mode, permutation_set(4), TransformSet(), 48, 32)
    batch = maker(torch.randint(0, 255, (3, 4, 48, 48), dtype=torch.uint8), torch.Generator().manual_seed(0))
    model = PretextModel(build_encoder({"name": "small_cnn", "width": 8}), mode, 4, 12, TransformSet().sizes)
    out = model(batch)
    if mode != "transform":
        assert out["order"].shape == (3, 12)
    if mode != "order":
        assert {out[h].shape for h in ("rotation", "scale", "shear")} == {(3, 3)}


def test_in_both_parallel_each_head_reads_its_own_branch():
    """The order head sees the shuffled branch only, the transform heads the transformed branch only: changing
    one branch's clips moves its own heads' logits and leaves the other's unchanged."""
    from sonossl.pretext.batch import PretextBatch

    torch.manual_seed(0)
    model = PretextModel(build_encoder({"name": "small_cnn", "width": 8}), "both-parallel", 4, 12,
                         TransformSet().sizes).eval()
    a, b = torch.rand(3, 4, 1, 32, 32), torch.rand(3, 4, 1, 32, 32)
    with torch.no_grad():
        base = model(PretextBatch(a, b, {}))
        new_order = model(PretextBatch(torch.rand_like(a), b, {}))
        new_transform = model(PretextBatch(a, torch.rand_like(b), {}))
    heads = ("rotation", "scale", "shear")
    assert not torch.allclose(new_order["order"], base["order"])
    assert all(torch.equal(new_order[h], base[h]) for h in heads)
    assert torch.equal(new_transform["order"], base["order"])
    assert not any(torch.allclose(new_transform[h], base[h]) for h in heads)


def test_downstream_heads():
    enc = build_encoder({"name": "small_cnn", "width": 8})
    assert PlaneClassifier(enc, 6)(torch.rand(2, 1, 32, 32)).shape == (2, 6)
    log_p = SaliencyModel(enc, 16)(torch.rand(2, 1, 32, 32))
    assert log_p.shape == (2, 16, 16)
    assert torch.allclose(log_p.exp().sum((1, 2)), torch.ones(2), atol=1e-5)


def test_a_plane_head_on_several_stages_sees_their_pooled_outputs_last_stage_last():
    enc = build_encoder({"name": "resnet18", "width": 8}).eval()
    x = torch.rand(2, 1, 48, 48)
    maps = enc.feature_maps(x)
    clf = PlaneClassifier(enc, 5, pool_stages=3)
    assert clf.head[1].in_features == 4 * 8 + 2 * 8 + 8 * 8 == enc.pooled_dim(3)
    feats = clf.features(x)
    assert torch.allclose(feats, torch.cat([m.mean((2, 3)) for m in maps[1:]], 1))
    assert torch.equal(feats[:, -enc.dim:], enc(x))  # the embedding that serving logs and drift compares
    assert clf(x).shape == (2, 5)
    assert torch.equal(PlaneClassifier(enc, 5).features(x), enc(x))  # the default is the last stage alone
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"pool_stages={bad}: the resnet18 encoder has 4 stages"):
            PlaneClassifier(enc, 5, pool_stages=bad)
