"""The DETR detector (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from detr_ot.models.backbone import Backbone
from detr_ot.models.position_encoding import PositionEmbeddingSine
from detr_ot.models.transformer import Transformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class DETR(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> class head and 3-layer box MLP on every decoder layer.

    ``sigmoid=False``: K+1 logits per query (softmax with a trailing no-object class).
    ``sigmoid=True``: K logits per query (independent sigmoids, no no-object class; focal/ranking losses).
    """

    def __init__(
        self,
        backbone: Backbone,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
        sigmoid: bool = False,
    ) -> None:
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.position = PositionEmbeddingSine(d // 2)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d)
        self.sigmoid = sigmoid
        self.num_classes = num_classes
        self.class_embed = nn.Linear(d, num_classes if sigmoid else num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.aux_loss = aux_loss
        if sigmoid:  # prior probability 0.01 (Lin et al., focal loss, ICCV 2017)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        feats, fmask = self.backbone(images, mask)
        pos = self.position(fmask).to(feats.dtype)
        states = self.transformer(self.input_proj(feats), fmask, self.query_embed.weight, pos)
        logits = self.class_embed(states)
        boxes = self.bbox_embed(states).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out
