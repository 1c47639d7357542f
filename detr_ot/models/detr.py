"""The DETR detector (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from detr_ot.models.backbone import Backbone
from detr_ot.models.position_encoding import PositionEmbeddingSine
from detr_ot.models.transformer import Transformer, feature_centres, gaussian_attention_bias, sine_box_embedding

QUERY_TYPES = ("learned", "anchor")


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

    ``query_type="learned"``: the paper's decoder, learned positional query embeddings, boxes predicted from
    scratch by every layer. ``query_type="anchor"``: every query is a learned anchor box; each decoder layer's
    positional query is an MLP of the anchor's sine embedding and the box head predicts a correction in logit
    space, ``box = sigmoid(delta + logit(anchor))``, which becomes the (detached) anchor of the next layer
    (DAB-DETR, Liu et al., ICLR 2022, sec. 4; iterative refinement of Deformable DETR, Zhu et al., ICLR 2021).
    Anchors make the decoder's cross-attention local from the first step, so small models converge in far
    fewer epochs; the matching and the losses see the same outputs either way. ``anchor_sigma`` > 0 adds
    a Gaussian spatial prior around each anchor to the cross-attention logits (SMCA, Gao et al., ICCV 2021),
    with standard deviations ``anchor_sigma`` times the anchor's width and height.
    """

    def __init__(
        self,
        backbone: Backbone,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
        sigmoid: bool = False,
        query_type: str = "learned",
        anchor_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        if query_type not in QUERY_TYPES:
            raise ValueError(f"model.query_type={query_type!r}: choose one of {QUERY_TYPES}")
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.position = PositionEmbeddingSine(d // 2)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.query_type = query_type
        self.anchor_sigma = anchor_sigma
        if query_type == "learned":
            self.query_embed = nn.Embedding(num_queries, d)
        else:
            self.anchors = nn.Embedding(num_queries, 4)  # logits of (cx, cy, w, h)
            with torch.no_grad():  # centres spread over the image, boxes a quarter of its side
                self.anchors.weight[:, :2].uniform_(0.05, 0.95).logit_()
                self.anchors.weight[:, 2:].fill_(0.25).logit_()
            self.anchor_pos = MLP(2 * d, d, d, 2)
        self.sigmoid = sigmoid
        self.num_classes = num_classes
        self.class_embed = nn.Linear(d, num_classes if sigmoid else num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.aux_loss = aux_loss
        if sigmoid:  # prior probability 0.01 (Lin et al., focal loss, ICCV 2017)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if query_type == "anchor":  # start every prediction at its anchor
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        feats, fmask = self.backbone(images, mask)
        pos = self.position(fmask).to(feats.dtype)
        src = self.input_proj(feats)
        if self.query_type == "learned":
            states = self.transformer(src, fmask, self.query_embed.weight, pos)
            logits = self.class_embed(states)
            boxes = self.bbox_embed(states).sigmoid()
        else:
            logits, boxes = self._decode_anchors(src, fmask, pos)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out

    def _decode_anchors(
        self, src: torch.Tensor, fmask: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder with anchor queries refined layer by layer: (logits (L,B,Q,·), boxes (L,B,Q,4))."""
        tr = self.transformer
        memory, pos, key_mask = tr.encode(src, fmask, pos)
        anchor = self.anchors.weight.sigmoid()[None].expand(src.shape[0], -1, -1)
        tgt = torch.zeros(*anchor.shape[:2], tr.d_model, dtype=memory.dtype, device=memory.device)
        centres = feature_centres(fmask) if self.anchor_sigma > 0 else None
        logits, boxes = [], []
        for layer in tr.decoder:
            query_pos = self.anchor_pos(sine_box_embedding(anchor, tr.d_model // 2).to(memory.dtype))
            bias = None
            if centres is not None:
                nhead = layer.cross_attn.num_heads
                bias = gaussian_attention_bias(anchor, centres, key_mask, self.anchor_sigma, nhead).to(memory.dtype)
            tgt = layer(tgt, memory, pos, query_pos, key_mask, bias)
            state = tr.decoder_norm(tgt)
            box = (self.bbox_embed(state) + anchor.clamp(1e-4, 1 - 1e-4).logit()).sigmoid()
            logits.append(self.class_embed(state))
            boxes.append(box)
            anchor = box.detach()
        return torch.stack(logits), torch.stack(boxes)
