"""Downstream heads on a (pretrained or fresh) encoder: standard-plane classification and saliency prediction.

``PlaneClassifier`` is the encoder plus one linear layer on the pooled embedding: trained end to end it is the
fine-tune, on a frozen encoder it is the linear probe. With ``pool_stages=k`` the layer sees the pooled outputs of
the encoder's last k stages, concatenated (``PooledFeatures``), not the last stage's alone: a pretext-trained
encoder's last stage specialises in the pretext tasks, and what transfers may sit in the stages before it.
``SaliencyModel`` puts a light decoder on the encoder's last three feature maps (1x1 projections, upsampled and
summed, two convolutions) and returns a log-probability map over pixels, trained with the KL divergence to the gaze
density, as in the saliency literature.

    clf = PlaneClassifier(encoder, n_classes=6);  logits = clf(frames)          # (B, 6)
    clf = PlaneClassifier(encoder, 6, pool_stages=3)                            # head on stages 2-4 of a ResNet
    sal = SaliencyModel(encoder, out_size=32);    log_p = sal(frames)           # (B, 32, 32), logsumexp = 0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sonossl.models.encoder import Encoder


class PooledFeatures(nn.Module):
    """What a plane classifier's head sees: ``encoder.pooled(frames, stages)``, (B, dim)."""

    def __init__(self, encoder: Encoder, stages: int = 1):
        super().__init__()
        encoder.pooled_dim(stages)  # fails here, not in the first batch, when the encoder has fewer stages
        self.encoder = encoder
        self.stages = stages

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder.pooled(frames, self.stages)


class PlaneClassifier(nn.Module):
    def __init__(self, encoder: Encoder, n_classes: int, dropout: float = 0.0, pool_stages: int = 1):
        super().__init__()
        self.encoder = encoder
        self.pool_stages = pool_stages
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.pooled_dim(pool_stages), n_classes))

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """The head's input; its last ``encoder.dim`` columns are the encoder's embedding."""
        return self.encoder.pooled(frames, self.pool_stages)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(frames))


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
