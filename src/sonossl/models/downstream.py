"""Downstream heads on a (pretrained or fresh) encoder: standard-plane classification and saliency prediction.

``PlaneClassifier`` is the encoder plus one linear layer on the pooled embedding: trained end to end it is the
fine-tune, on a frozen encoder it is the linear probe. ``SaliencyModel`` puts a light decoder on the encoder's last
three feature maps (1x1 projections, upsampled and summed, two convolutions) and returns a log-probability map over
pixels, trained with the KL divergence to the gaze density, as in the saliency literature.

    clf = PlaneClassifier(encoder, n_classes=6);  logits = clf(frames)          # (B, 6)
    sal = SaliencyModel(encoder, out_size=32);    log_p = sal(frames)           # (B, 32, 32), logsumexp = 0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sonossl.models.encoder import Encoder


class PlaneClassifier(nn.Module):
    def __init__(self, encoder: Encoder, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.dim, n_classes))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(frames))


class SaliencyModel(nn.Module):
    def __init__(self, encoder: Encoder, out_size: int, channels: int = 32, levels: int = 3):
        super().__init__()
        self.encoder = encoder
        self.out_size = out_size
        self.levels = levels
        self.project = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in encoder.channels[-levels:])
        self.decode = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(channels, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        maps = self.encoder.feature_maps(frames)[-self.levels:]
        size = maps[0].shape[-2:]
        x = sum(F.interpolate(p(m), size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size
                else p(m) for p, m in zip(self.project, maps))
        x = self.decode(F.relu(x))
        x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return F.log_softmax(x.flatten(1), dim=1).reshape(-1, self.out_size, self.out_size)
