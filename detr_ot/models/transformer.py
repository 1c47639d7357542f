"""The DETR encoder-decoder transformer (Carion et al., ECCV 2020, sec. 3.2): post-norm layers, positional
encodings added to queries and keys of every attention, decoder outputs of every layer returned for the
auxiliary losses."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from detr_ot.models.backbone import valid_sizes


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim_ff, d_model)
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.drop1(self.self_attn(q, k, src, key_padding_mask=key_padding_mask)[0]))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim_ff, d_model)
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)
        self.drop3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_key_padding_mask: torch.Tensor,
        cross_attn_bias: torch.Tensor | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cross_attn_bias`` (B * nhead, Q, HW), optional: added to the cross-attention logits; it must then
        already hold -inf on the padded keys (``memory_key_padding_mask`` is not applied on top).
        ``self_attn_mask`` (Q, Q) bool, optional: True where a query may not attend to another (query groups,
        :mod:`detr_ot.models.query_groups`)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, attn_mask=self_attn_mask)[0]))
        if cross_attn_bias is None:
            attn = self.cross_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=memory_key_padding_mask)[0]
        else:
            attn = self.cross_attn(tgt + query_pos, memory + pos, memory, attn_mask=cross_attn_bias)[0]
        tgt = self.norm2(tgt + self.drop2(attn))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over ``num_queries`` learned query embeddings."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        enc = EncoderLayer(d_model, nhead, dim_feedforward, dropout)
        dec = DecoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.encoder = nn.ModuleList(copy.deepcopy(enc) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(copy.deepcopy(dec) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """src (B,C,H,W), mask (B,H,W) True on padding, pos (B,C,H,W) -> (memory (B,HW,C), pos (B,HW,C),
        key padding mask (B,HW))."""
        memory = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        key_mask = mask.flatten(1)
        for layer in self.encoder:
            memory = layer(memory, pos, key_mask)
        return memory, pos, key_mask

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        query_embed: torch.Tensor,
        pos: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DETR's decoding with learned query embeddings ``query_embed`` (Q,C) as positional queries ->
        decoder states of every layer (L,B,Q,C), normalised by the shared final LayerNorm. ``self_attn_mask``:
        see :meth:`DecoderLayer.forward`."""
        memory, pos, key_mask = self.encode(src, mask, pos)
        query_pos = query_embed[None].expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        states = []
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, query_pos, key_mask, self_attn_mask=self_attn_mask)
            states.append(self.decoder_norm(tgt))
        return torch.stack(states)


def sine_box_embedding(boxes: torch.Tensor, dim_per_coord: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalised boxes (..., 4) -> (..., 4 * dim_per_coord), each coordinate embedded as the
    image positions are (DAB-DETR, Liu et al., ICLR 2022, eq. 5)."""
    dim_t = torch.arange(dim_per_coord, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / dim_per_coord)
    angles = boxes.float()[..., None] * (2 * math.pi) / dim_t  # (..., 4, d)
    emb = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return emb.flatten(-2).to(boxes.dtype)


def feature_centres(mask: torch.Tensor) -> torch.Tensor:
    """Normalised (x, y) centres of the cells of a feature map, relative to each image's unpadded region:
    mask (B, H, W) True on padding -> (B, H * W, 2); padded cells get coordinates > 1 (they are masked)."""
    sizes = valid_sizes(mask).clamp(min=1).to(torch.float32)
    vh, vw = sizes[:, 0], sizes[:, 1]
    h, w = mask.shape[-2:]
    ys = (torch.arange(h, device=mask.device, dtype=torch.float32) + 0.5)[None, :] / vh[:, None]  # (B, H)
    xs = (torch.arange(w, device=mask.device, dtype=torch.float32) + 0.5)[None, :] / vw[:, None]  # (B, W)
    grid_x = xs[:, None, :].expand(-1, h, -1)
    grid_y = ys[:, :, None].expand(-1, -1, w)
    return torch.stack((grid_x, grid_y), dim=-1).flatten(1, 2)


def gaussian_attention_bias(
    anchors: torch.Tensor, centres: torch.Tensor, key_padding_mask: torch.Tensor, sigma: float, nhead: int
) -> torch.Tensor:
    """Log of a Gaussian spatial prior around each anchor, to add to cross-attention logits (SMCA, Gao et al.,
    ICCV 2021, eq. 3): ``-((x - cx)^2 / (2 (sigma w)^2) + (y - cy)^2 / (2 (sigma h)^2))``, -inf on padded keys.

    anchors (B, Q, 4) normalised cxcywh, centres (B, HW, 2), key_padding_mask (B, HW) -> (B * nhead, Q, HW)."""
    a = anchors.float()
    scale = (sigma * a[..., 2:]).clamp(min=1e-3)  # (B, Q, 2)
    diff = (centres[:, None, :, :] - a[:, :, None, :2]) / scale[:, :, None, :]  # (B, Q, HW, 2)
    bias = -0.5 * diff.square().sum(-1)
    bias = bias.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    return bias.repeat_interleave(nhead, dim=0)
