"""The frame encoder shared by every task: a 2D CNN that embeds one grey ultrasound frame.

Encoders are entries of ``ENCODERS``: ``resnet18`` is torchvision's ResNet-18 (``weights=None``: every model is
trained here) with a one-channel stem and a ``width`` option (64 is the standard network; 32 or 16 divide the
channels, for 2-core machines), and ``small_cnn`` is a four-block CNN for the tiny test profile. ``init`` picks how
the convolutions after the stem start: ``torchvision`` (kaiming-normal, fan-out; resnet18's own) or ``pytorch``
(PyTorch's layer default, kaiming-uniform a=sqrt(5); small_cnn's own, and what resnet18's stages had at a width
other than 64 until the stages were initialised as torchvision's). Frames go in as float in [0, 1], (B, 1, H, W) of
any size; the encoder normalises them itself, so the serving contract is just "grey levels / 255".

    enc = build_encoder({"name": "resnet18", "width": 32})
    emb = enc(frames)                    # (B, enc.dim)
    maps = enc.feature_maps(frames)      # one per stage, strides enc.strides
    multi = enc.pooled(frames, 3)        # (B, enc.pooled_dim(3)): the last three stages pooled, concatenated
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

GREY_MEAN = 0.25  # grey level / 255 of typical sector crops; fixed so that the input contract is fixed
GREY_STD = 0.25


class Encoder(nn.Module):
    """Stem + stages; ``forward`` gives the globally pooled embedding of the last stage."""

    def __init__(self, spec: dict[str, Any], stem: nn.Module, stages: list[nn.Module], channels: list[int],
                 strides: list[int]):
        super().__init__()
        self.spec = dict(spec)
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.strides = strides
        self.dim = channels[-1]
        self.channels_last = False

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"encoder input must be (B, 1, H, W) grey frames, got {tuple(x.shape)}")
        x = (x - GREY_MEAN) / GREY_STD
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self._prepare(x))
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)[-1].mean(dim=(2, 3))

    def pooled_dim(self, stages: int) -> int:
        """Width of ``pooled(x, stages)``; a clear error when the encoder has fewer stages."""
        if not 1 <= stages <= len(self.channels):
            raise ValueError(f"pool_stages={stages}: the {self.spec.get('name')} encoder has {len(self.channels)} "
                             "stages; pool 1 (the last stage only) to all of them")
        return sum(self.channels[-stages:])

    def pooled(self, x: torch.Tensor, stages: int = 1) -> torch.Tensor:
        """The globally pooled outputs of the last ``stages`` stages, concatenated, the last stage last
        (``stages=1`` is ``forward``)."""
        self.pooled_dim(stages)
        if stages == 1:
            return self(x)
        return torch.cat([m.mean(dim=(2, 3)) for m in self.feature_maps(x)[-stages:]], 1)


INITS = ("torchvision", "pytorch")  # the ``init`` of a spec: how the convolutions after the stem start


def _kaiming_fan_out(modules: list[nn.Module]) -> None:
    """torchvision's ResNet initialisation of every convolution among ``modules`` (ResNet.__init__)."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _resnet18(width: int = 64, maxpool: bool = True, init: str = "torchvision") -> Encoder:
    import torchvision
    from torchvision.models.resnet import BasicBlock

    net = torchvision.models.resnet18(weights=None)  # every convolution initialised as torchvision does
    if width != 64:  # rebuild the stages with fewer channels (torchvision has no width option for BasicBlock)
        net.inplanes = width
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    after_stem = [m for stage in stages for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if init == "torchvision" and width != 64:  # the rebuilt stages start with PyTorch's default
        _kaiming_fan_out(after_stem)
    elif init == "pytorch" and width == 64:  # torchvision re-initialised them
        for m in after_stem:
            m.reset_parameters()
    net.conv1 = nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
    _kaiming_fan_out([net.conv1])  # the stem as torchvision's, whatever ``init`` says
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, *([net.maxpool] if maxpool else []))
    s = 4 if maxpool else 2
    spec = {"name": "resnet18", "width": width, "maxpool": maxpool, "init": init}
    channels = [width, 2 * width, 4 * width, 8 * width]
    return Encoder(spec, stem, stages, channels, [s, 2 * s, 4 * s, 8 * s])


def _small_cnn(width: int = 16, maxpool: bool = True, init: str = "pytorch") -> Encoder:
    if not maxpool:  # it downsamples with strided convolutions: there is no max-pool to leave out
        raise ValueError("encoder: small_cnn has no max-pool (strided convolutions downsample); maxpool: false "
                         "applies to resnet18 only")

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    channels = [width, 2 * width, 4 * width, 8 * width]
    stages = [block(1 if i == 0 else channels[i - 1], c) for i, c in enumerate(channels)]
    if init == "torchvision":
        _kaiming_fan_out([m for stage in stages for m in stage.modules()])
    spec = {"name": "small_cnn", "width": width, "maxpool": maxpool, "init": init}
    return Encoder(spec, nn.Identity(), stages, channels, [2, 4, 8, 16])


ENCODERS: dict[str, Callable[..., Encoder]] = {"resnet18": _resnet18, "small_cnn": _small_cnn}


def build_encoder(spec: dict[str, Any]) -> Encoder:
    """An untrained encoder from its spec ``{"name", "width", "maxpool", "init"}`` (as stored in checkpoints; a
    missing or null ``init`` is the network's own: resnet18 torchvision, small_cnn pytorch). Checkpoints written
    before the spec had ``init`` say nothing of how they started: a resnet18 at a width other than 64 from before
    a8b5d3e started as ``pytorch`` does now, its rebuilt network starts as ``torchvision``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in ENCODERS:
        raise ValueError(f"encoder {name!r} is not one of {sorted(ENCODERS)}")
    width = int(spec.pop("width", 64))
    if width < 4:
        raise ValueError(f"encoder.width={width}: must be at least 4")
    maxpool = bool(spec.pop("maxpool", True))
    init = spec.pop("init", None)
    if init is not None and init not in INITS:
        raise ValueError(f"encoder.init={init!r}: must be one of {list(INITS)}, or null for the network's own")
    if spec:
        raise ValueError(f"encoder spec: unknown key(s) {sorted(spec)}; valid keys are name, width, maxpool, init")
    return ENCODERS[name](width=width, maxpool=maxpool, **({"init": init} if init else {}))
