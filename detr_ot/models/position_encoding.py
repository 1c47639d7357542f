"""Sine positional encoding of DETR (Carion et al., ECCV 2020, following Vaswani et al. 2017)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine/cosine embedding computed over the unpadded region only (so it does not depend
    on padding). Returns (B, 2 * num_pos_feats, H, W)."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        eps = 1e-6
        y = y / (y[:, -1:, :].amax(2, keepdim=True) + eps) * self.scale
        x = x / (x[:, :, -1:].amax(1, keepdim=True) + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        px = x[..., None] / dim_t
        py = y[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
