"""Pretext heads and the pretext model (Jiao et al., ISBI 2020; order head after VCOP, Xu et al., CVPR 2019).

The encoder embeds every frame of a clip with shared weights. The order head reads each pair of frames (i < j)
through a shared layer, concatenates the pair codes in a fixed pair order and classifies the permutation. A pair is
(f_i, f_j, |f_i - f_j|): the difference hands the head a distance between frames from the start, and the order of a
clip up to reversal is what the distances between its frames imply (frames close in time look alike). Each frame
is its third-stage feature map pooled to an ``ORDER_GRID`` x ``ORDER_GRID`` grid rather than one global vector, so
that where structures are, and how they moved, is not averaged away. The transform heads, one per factor
(rotation, scale, shear), read the clip feature: the mean of its frames' pooled last-stage embeddings.

    model = PretextModel(encoder, mode="both-sequential", k=4, n_orders=12, transform_sizes={"rotation": 3, ...})
    logits = model(batch)             # {"order": (B, 12), "rotation": (B, 3), "scale": (B, 3), "shear": (B, 3)}
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from sonossl.models.encoder import Encoder
from sonossl.pretext.batch import PretextBatch, check_mode

ORDER_GRID = 4


class OrderHead(nn.Module):
    def __init__(self, dim: int, k: int, n_classes: int, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.pairs = list(itertools.combinations(range(k), 2))
        self.pair = nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(len(self.pairs) * hidden, n_classes))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, K, D) -> (B, n_classes)
        i, j = zip(*self.pairs)
        a, b = feats[:, list(i)], feats[:, list(j)]
        pairs = torch.cat([a, b, (a - b).abs()], dim=-1)  # (B, P, 3D)
        return self.out(self.pair(pairs).flatten(1))


class TransformHeads(nn.Module):
    def __init__(self, dim: int, sizes: dict[str, int], hidden: int = 128):
        super().__init__()
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n))
            for name, n in sizes.items()
        })

    def forward(self, clip_feat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(clip_feat) for name, head in self.heads.items()}


class PretextModel(nn.Module):
    def __init__(self, encoder: Encoder, mode: str, k: int, n_orders: int, transform_sizes: dict[str, int]):
        super().__init__()
        self.mode = check_mode(mode)
        self.encoder = encoder
        self.order = OrderHead(encoder.channels[-2] * ORDER_GRID**2, k, n_orders) if mode != "transform" else None
        self.transform = TransformHeads(encoder.dim, transform_sizes) if mode != "order" else None

    def embed_clips(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, 1, H, W) -> grid features (B, K, D * ORDER_GRID**2) and pooled embeddings (B, K, D)."""
        b, k = clips.shape[:2]
        maps = self.encoder.feature_maps(clips.flatten(0, 1))
        grid = F.adaptive_avg_pool2d(maps[-2], ORDER_GRID).flatten(1).reshape(b, k, -1)
        return grid, maps[-1].mean(dim=(2, 3)).reshape(b, k, -1)

    def forward(self, batch: PretextBatch) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        order_feats = self.embed_clips(batch.order_clips) if batch.order_clips is not None else None
        if self.order is not None and order_feats is not None:
            out["order"] = self.order(order_feats[0])
        if self.transform is not None and batch.transform_clips is not None:
            feats = order_feats if batch.same_clips else self.embed_clips(batch.transform_clips)
            out.update(self.transform(feats[1].mean(dim=1)))
        return out
