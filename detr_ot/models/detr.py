"""The DETR detector (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from detr_ot.models.backbone import Backbone
from detr_ot.models.position_encoding import PositionEmbeddingSine
from detr_ot.models.query_groups import QueryGroups
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

    ``num_queries_o2m`` > 0 adds a group of that many queries (of the same type) for the one-to-many branch of
    hybrid matching (Jia et al., "DETRs with Hybrid Matching", CVPR 2023, sec. 3.2): decoded with the
    one-to-one queries in training only, masked from them in self-attention, returned under
    ``outputs["one_to_many"]`` (:mod:`detr_ot.models.query_groups`). Its embeddings are created after every
    other parameter, so with the same seed the one-to-one part of the model is initialised as without it.
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
        num_queries_o2m: int = 0,
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
        self.groups = QueryGroups(num_queries, num_queries_o2m)
        if query_type == "learned":
            self.query_embed = nn.Embedding(num_queries, d)
        else:
            self.anchors = anchor_embedding(num_queries)
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
        if num_queries_o2m > 0:  # last, so that the rest is initialised as without the group
            self.query_embed_o2m = (
                nn.Embedding(num_queries_o2m, d) if query_type == "learned" else anchor_embedding(num_queries_o2m)
            )

    def _queries(self, weight: nn.Embedding, extra: str, n: int) -> torch.Tensor:
        """The first ``n`` query parameters: the one-to-one group, then the one-to-many group if ``n`` asks."""
        if n == weight.num_embeddings:
            return weight.weight
        return torch.cat([weight.weight, getattr(self, extra).weight])

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        feats, fmask = self.backbone(images, mask)
        pos = self.position(fmask).to(feats.dtype)
        src = self.input_proj(feats)
        n = self.groups.active(self.training)
        attn_mask = self.groups.self_attn_mask(n, src.device)
        if self.query_type == "learned":
            queries = self._queries(self.query_embed, "query_embed_o2m", n)
            states = self.transformer(src, fmask, queries, pos, self_attn_mask=attn_mask)
            logits = self.class_embed(states)
            boxes = self.bbox_embed(states).sigmoid()
        else:
            anchors = self._queries(self.anchors, "query_embed_o2m", n)
            logits, boxes = self._decode_anchors(src, fmask, pos, anchors, attn_mask)
        return self.groups.split(logits, boxes, self.aux_loss)

    def _decode_anchors(
        self,
        src: torch.Tensor,
        fmask: torch.Tensor,
        pos: torch.Tensor,
        anchor_logits: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder with anchor queries (logits of boxes, (Q,4)) refined layer by layer: (logits (L,B,Q,·),
        boxes (L,B,Q,4))."""
        tr = self.transformer
        memory, pos, key_mask = tr.encode(src, fmask, pos)
        anchor = anchor_logits.sigmoid()[None].expand(src.shape[0], -1, -1)
        tgt = torch.zeros(*anchor.shape[:2], tr.d_model, dtype=memory.dtype, device=memory.device)
        centres = feature_centres(fmask) if self.anchor_sigma > 0 else None
        logits, boxes = [], []
        for layer in tr.decoder:
            query_pos = self.anchor_pos(sine_box_embedding(anchor, tr.d_model // 2).to(memory.dtype))
            bias = None
            if centres is not None:
                nhead = layer.cross_attn.num_heads
                bias = gaussian_attention_bias(anchor, centres, key_mask, self.anchor_sigma, nhead).to(memory.dtype)
            tgt = layer(tgt, memory, pos, query_pos, key_mask, bias, self_attn_mask)
            state = tr.decoder_norm(tgt)
            box = (self.bbox_embed(state) + anchor.clamp(1e-4, 1 - 1e-4).logit()).sigmoid()
            logits.append(self.class_embed(state))
            boxes.append(box)
            anchor = box.detach()
        return torch.stack(logits), torch.stack(boxes)


def anchor_embedding(num: int) -> nn.Embedding:
    """``num`` learned anchor boxes, stored as logits of (cx, cy, w, h): centres spread uniformly over the image,
    boxes a quarter of its side."""
    anchors = nn.Embedding(num, 4)
    with torch.no_grad():
        anchors.weight[:, :2].uniform_(0.05, 0.95).logit_()
        anchors.weight[:, 2:].fill_(0.25).logit_()
    return anchors
