"""The DETR encoder-decoder transformer (Carion et al., ECCV 2020, sec. 3.2): post-norm layers, positional
encodings added to queries and keys of every attention, decoder outputs of every layer returned for the
auxiliary losses."""

from __future__ import annotations

import copy

import torch
from torch import nn


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
    ) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt)[0]))
        attn = self.cross_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=memory_key_padding_mask)[0]
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

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor, query_embed: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """src (B,C,H,W), mask (B,H,W) True on padding, query_embed (Q,C), pos (B,C,H,W) ->
        decoder states of every layer (L,B,Q,C), normalised by the shared final LayerNorm."""
        b = src.shape[0]
        memory = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        key_mask = mask.flatten(1)
        for layer in self.encoder:
            memory = layer(memory, pos, key_mask)
        query_pos = query_embed[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        states = []
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, query_pos, key_mask)
            states.append(self.decoder_norm(tgt))
        return torch.stack(states)
