"""Deformable DETR and its fast-converging variants, beside DETR and with the same outputs dict.

Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021: a
multi-scale feature pyramid (sec. 4.1), an encoder and a decoder whose attention samples a few points around
reference points (eqs. 2-3, :class:`~detr_ot.models.deform_attn.MSDeformAttn`), iterative bounding-box
refinement and the two-stage variant (App. A.4). On top, two refinements from Zhang et al., "DINO: DETR with
Improved DeNoising Anchor Boxes", ICLR 2023 (sec. 3.3 mixed query selection, sec. 3.4 look forward twice), and
the anchor-box query formulation of Liu et al., "DAB-DETR", ICLR 2022 (sec. 4): every decoder query carries a
box, whose sine embedding through an MLP is its positional query.

Padding invariance: every component computes an image's outputs from its own valid region only -- the
backbone masks its convolutions, the GroupNorm statistics are taken over valid cells, the extra pyramid
levels convolve zeros on padding, positions and reference points are normalised by each image's valid
size, deformable attention reads zeros on padded cells, and two-stage proposals are never chosen on padding.
So an image's detections do not depend on the other images of its batch.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from detr_ot.models.backbone import Backbone, valid_sizes
from detr_ot.models.deform_attn import MSDeformAttn
from detr_ot.models.detr import MLP, anchor_embedding
from detr_ot.models.position_encoding import PositionEmbeddingSine
from detr_ot.models.query_groups import QueryGroups
from detr_ot.models.transformer import feature_centres, sine_box_embedding

_EPS = 1e-5  # clamp of inverse_sigmoid, as DINO's box refinement


def inverse_sigmoid(x: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]`` (finite for boxes at the border)."""
    return x.clamp(eps, 1 - eps).logit()


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm (Wu and He, ECCV 2018) whose statistics are computed over each image's valid cells only.

    ``forward(x (B,C,H,W), mask (B,H,W) True on padding)``: per image and group, mean and variance are taken
    over the unpadded cells, so the result on the valid region equals ``nn.GroupNorm`` applied to the
    unpadded image; padded cells are set to zero (so a following convolution sees what it would see past
    the border of the unpadded image). Statistics are computed in at least float32.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        if mask.shape != (b, h, w):
            raise ValueError(f"MaskedGroupNorm: mask must be (B,H,W)={(b, h, w)}, got {tuple(mask.shape)}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        g = self.num_groups
        valid = (~mask).to(dtype)[:, None, None]  # (B, 1, 1, H, W)
        xg = x.to(dtype).reshape(b, g, c // g, h, w)
        count = (valid.sum((3, 4), keepdim=True) * (c // g)).clamp(min=1)
        mean = (xg * valid).sum((2, 3, 4), keepdim=True) / count
        var = ((xg - mean).square() * valid).sum((2, 3, 4), keepdim=True) / count
        y = ((xg - mean) * torch.rsqrt(var + self.eps) * valid).reshape(b, c, h, w)
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
            y = y * valid[:, 0]
        return y.to(x.dtype)


class LevelProjection(nn.Module):
    """Convolution + masked GroupNorm that maps one pyramid level to ``d`` channels (Zhu et al., Deformable
    DETR, ICLR 2021, sec. 4.1: 1x1 convs on C3-C5, a 3x3 stride-2 conv for each extra level)."""

    def __init__(self, cin: int, d: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, d, kernel, stride, kernel // 2)
        self.norm = MaskedGroupNorm(math.gcd(32, d), d)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x), mask)


def _halve_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Padding mask of a stride-2 conv's output of size ``hw``: the valid region ``ceil(h / 2) x ceil(w / 2)``."""
    sizes = torch.div(valid_sizes(mask) + 1, 2, rounding_mode="floor")
    rows = torch.arange(hw[0], device=mask.device)[None, :] < sizes[:, :1]
    cols = torch.arange(hw[1], device=mask.device)[None, :] < sizes[:, 1:]
    return ~(rows[:, :, None] & cols[:, None, :])


def _ffn(d: int, dim_ff: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, dim_ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim_ff, d))


class DeformableEncoderLayer(nn.Module):
    """Multi-scale deformable self-attention over all levels at every cell, then an FFN; post-norm (Zhu et
    al., Deformable DETR, ICLR 2021, sec. 4.1 "Deformable Transformer Encoder")."""

    def __init__(self, d: int, nhead: int, dim_ff: int, dropout: float, n_levels: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d, n_levels, nhead, n_points)
        self.ffn = _ffn(d, dim_ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        shapes: list[list[int]],
        level_start: list[int],
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        attn = self.self_attn(src + pos, reference_points, src, shapes, level_start, padding_mask)
        src = self.norm1(src + self.drop1(attn))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DeformableDecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention around each query's reference box, FFN;
    post-norm (Zhu et al., Deformable DETR, ICLR 2021, sec. 4.1 "Deformable Transformer Decoder")."""

    def __init__(self, d: int, nhead: int, dim_ff: int, dropout: float, n_levels: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformAttn(d, n_levels, nhead, n_points)
        self.ffn = _ffn(d, dim_ff, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        shapes: list[list[int]],
        level_start: list[int],
        padding_mask: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, attn_mask=self_attn_mask)[0]))
        attn = self.cross_attn(tgt + query_pos, reference_boxes, memory, shapes, level_start, padding_mask)
        tgt = self.norm2(tgt + self.drop2(attn))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class DeformableDETR(nn.Module):
    """Multi-scale deformable DETR (Zhu et al., ICLR 2021) returning DETR's outputs dict.

    Outputs: ``pred_logits`` (B,Q,K) for the sigmoid head or (B,Q,K+1) for the softmax head, ``pred_boxes``
    (B,Q,4) normalised cxcywh, ``aux_outputs`` (the earlier decoder layers) and, with ``two_stage``,
    ``enc_outputs``: the class logits and boxes of the ``Q`` encoder proposals selected as the decoder's
    references, so the criterion matches and supervises them as one more layer.

    * Pyramid (sec. 4.1): the backbone's last levels through 1x1 conv + GroupNorm, extra levels by 3x3
      stride-2 conv + GroupNorm up to ``num_feature_levels``; a learned level embedding is added to the sine
      position embedding of each level.
    * ``box_refine`` (App. A.4): one box head per decoder layer predicting ``sigmoid(delta + logit(ref))``;
      the detached box is the next layer's reference. Without it, the heads are shared and every layer
      refines the same initial reference.
    * ``two_stage`` (App. A.4): every encoder cell proposes a box (its centre, side ``0.05 * 2^l`` on level
      ``l``) corrected by a box head on the encoder memory; the top ``Q`` cells by their best class logit
      give the decoder's reference boxes (detached). Content queries come from the proposals' position
      embedding (Deformable DETR) or, with ``mixed_query_selection``, are learned and static (Zhang et al.,
      DINO, ICLR 2023, sec. 3.3).
    * Without ``two_stage``: learned anchor boxes are the references and learned content queries the
      queries (Liu et al., DAB-DETR, ICLR 2022, sec. 4).
    * ``look_forward_twice`` (DINO, sec. 3.4): layer ``i``'s box for its loss is built on layer ``i-1``'s
      undetached box, so that loss also updates layer ``i-1``'s box head; the next reference stays detached.
    * The positional query of every decoder layer is an MLP of the sine embedding of its reference box
      (DAB-DETR, eq. 5).
    * ``num_queries_o2m`` > 0: a one-to-many query group for hybrid matching (Jia et al., CVPR 2023, sec. 3.2;
      :mod:`detr_ot.models.query_groups`), decoded in training only and masked from the one-to-one queries.
      Two-stage: its references are the next ``num_queries_o2m`` proposals after the top ``Q`` (as H-DETR),
      ``enc_outputs`` stays the top ``Q``; otherwise it has its own learned anchors and content queries.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        num_queries: int,
        d_model: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_points: int = 4,
        dec_points: int = 4,
        two_stage: bool = True,
        box_refine: bool = True,
        mixed_query_selection: bool = False,
        look_forward_twice: bool = False,
        aux_loss: bool = True,
        sigmoid: bool = True,
        num_queries_o2m: int = 0,
    ) -> None:
        super().__init__()
        channels = list(backbone.num_channels_list)
        if not 1 <= len(channels) <= num_feature_levels:
            raise ValueError(
                f"model.num_feature_levels={num_feature_levels}: the backbone gives {len(channels)} levels; "
                "need between 1 and num_feature_levels"
            )
        if mixed_query_selection and not two_stage:
            raise ValueError("model.mixed_query_selection=true needs model.two_stage=true (it selects proposals)")
        if look_forward_twice and not box_refine:
            raise ValueError("model.look_forward_twice=true needs model.box_refine=true (one box head per layer)")
        if d_model % 2 or d_model % nheads:
            raise ValueError(f"model.hidden_dim={d_model} must be even and divisible by model.nheads={nheads}")
        d = d_model
        self.backbone = backbone
        self.d_model = d
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.sigmoid = sigmoid
        self.two_stage = two_stage
        self.box_refine = box_refine
        self.mixed_query_selection = mixed_query_selection
        self.look_forward_twice = look_forward_twice
        self.aux_loss = aux_loss
        self.num_feature_levels = num_feature_levels

        projections = [LevelProjection(c, d, 1, 1) for c in channels]
        cin = channels[-1]
        for _ in range(num_feature_levels - len(channels)):
            projections.append(LevelProjection(cin, d, 3, 2))
            cin = d
        self.input_proj = nn.ModuleList(projections)
        self.position = PositionEmbeddingSine(d // 2)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d))

        enc = DeformableEncoderLayer(d, nheads, dim_feedforward, dropout, num_feature_levels, enc_points)
        dec = DeformableDecoderLayer(d, nheads, dim_feedforward, dropout, num_feature_levels, dec_points)
        self.encoder = nn.ModuleList(copy.deepcopy(enc) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(copy.deepcopy(dec) for _ in range(dec_layers))
        self.query_pos_head = MLP(2 * d, d, d, 2)

        num_logits = num_classes if sigmoid else num_classes + 1
        heads = dec_layers if box_refine else 1
        self.class_embed = nn.ModuleList(nn.Linear(d, num_logits) for _ in range(heads))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(heads))
        if two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.enc_class_embed = nn.Linear(d, num_logits)
            self.enc_bbox_embed = MLP(d, d, 4, 3)
            if not mixed_query_selection:  # content queries from the proposals' position embedding
                self.pos_trans = nn.Linear(2 * d, d)
                self.pos_trans_norm = nn.LayerNorm(d)
        else:
            self.anchors = nn.Embedding(num_queries, 4)  # logits of (cx, cy, w, h)
        if not two_stage or mixed_query_selection:
            self.content = nn.Embedding(num_queries, d)
        self._reset_parameters()
        self.groups = QueryGroups(num_queries, num_queries_o2m)
        if num_queries_o2m > 0:  # last, so that the rest is initialised as without the group
            if not two_stage:
                self.anchors_o2m = anchor_embedding(num_queries_o2m)
            if not two_stage or mixed_query_selection:
                self.content_o2m = nn.Embedding(num_queries_o2m, d)

    def _reset_parameters(self) -> None:
        """Xavier for the transformer's matrices, the deformable attention's own initialisation, level
        embeddings ~ N(0, 1), class biases at prior 0.01 (sigmoid head; Lin et al., focal loss, ICCV 2017),
        box heads' last layers at zero so every first prediction is its reference (Zhu et al., 2021)."""
        for module in (*self.encoder, *self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        heads = [*self.class_embed] + ([self.enc_class_embed] if self.two_stage else [])
        boxes = [*self.bbox_embed] + ([self.enc_bbox_embed] if self.two_stage else [])
        for head in heads:
            if self.sigmoid:
                nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
        for head in boxes:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if not self.two_stage:
            with torch.no_grad():  # centres spread over the image, boxes a quarter of its side (as DETR's)
                self.anchors.weight[:, :2].uniform_(0.05, 0.95).logit_()
                self.anchors.weight[:, 2:].fill_(0.25).logit_()

    # ------------------------------------------------------------------------------------------------------

    def pyramid(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Projected levels (B,d,H_l,W_l), zero on padding, and their padding masks (B,H_l,W_l)."""
        levels = self.backbone.forward_levels(images, mask)
        srcs, masks = [], []
        for proj, (feat, fmask) in zip(self.input_proj, levels, strict=False):
            srcs.append(proj(feat, fmask))
            masks.append(fmask)
        x, xmask = levels[-1]
        for proj in self.input_proj[len(levels):]:
            x = proj.conv(x.masked_fill(xmask[:, None], 0.0))  # the 3x3 conv sees zeros on padding
            xmask = _halve_mask(xmask, (x.shape[-2], x.shape[-1]))
            x = proj.norm(x, xmask)
            srcs.append(x)
            masks.append(xmask)
        return srcs, masks

    def proposals(self, masks: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stage base boxes (B,S,4) cxcywh normalised over each image's valid region: the centre of every
        cell, side ``0.05 * 2^l`` on level ``l``; and (B,S) whether a cell may be selected (not padding,
        every coordinate inside (0.01, 0.99)) (Zhu et al., Deformable DETR, ICLR 2021, App. A.4)."""
        boxes, pads = [], []
        for lvl, m in enumerate(masks):
            centres = feature_centres(m).to(dtype)
            boxes.append(torch.cat((centres, torch.full_like(centres, 0.05 * 2.0**lvl)), -1))
            pads.append(m.flatten(1))
        props = torch.cat(boxes, 1)
        valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~torch.cat(pads, 1)
        return props, valid

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        srcs, masks = self.pyramid(images, mask)
        if len(srcs) != self.num_feature_levels:
            raise RuntimeError(f"the backbone gave {len(srcs)} levels, expected {len(self.input_proj)}")
        dtype = srcs[0].dtype
        shapes = [[s.shape[-2], s.shape[-1]] for s in srcs]
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, d)
        pad = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
        pos = torch.cat(
            [self.position(m).to(dtype).flatten(2).transpose(1, 2) + self.level_embed[lvl].to(dtype)
             for lvl, m in enumerate(masks)], 1,
        )
        # valid ratios (x, y) of every level: valid cells / padded cells (sec. 4.1 reference points)
        ratios = torch.stack(
            [valid_sizes(m).flip(-1).to(dtype) / torch.tensor([w, h], dtype=dtype, device=m.device)
             for m, (h, w) in zip(masks, shapes, strict=True)], 1,
        )  # (B, L, 2)
        centres = torch.cat([feature_centres(m) for m in masks], 1).to(dtype)  # (B, S, 2), valid-normalised
        enc_ref = centres[:, :, None] * ratios[:, None]  # (B, S, L, 2) over each level's padded map
        for layer in self.encoder:
            memory = layer(memory, pos, enc_ref, shapes, starts, pad)

        out: dict = {}
        n = self.groups.active(self.training)  # queries to decode: + the one-to-many group in training
        if self.two_stage:
            reference, tgt, out["enc_outputs"] = self._select(memory, masks, dtype, n)
        else:
            b = memory.shape[0]
            reference = self._group_weight("anchors", n).sigmoid()[None].expand(b, -1, -1)
            tgt = self._group_weight("content", n)[None].expand(b, -1, -1)
        attn_mask = self.groups.self_attn_mask(n, memory.device)
        logits, boxes = self._decode(tgt, reference, memory, shapes, starts, pad, ratios, attn_mask)
        out.update(self.groups.split(torch.stack(logits), torch.stack(boxes), self.aux_loss))
        return out

    def _group_weight(self, name: str, n: int) -> torch.Tensor:
        """Embedding ``name`` of the first ``n`` queries: the one-to-one group, then ``name_o2m`` if asked."""
        weight = getattr(self, name).weight
        return weight if n == self.num_queries else torch.cat([weight, getattr(self, name + "_o2m").weight])

    def _select(
        self, memory: torch.Tensor, masks: list[torch.Tensor], dtype: torch.dtype, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Two-stage query selection (Zhu et al., 2021, App. A.4; Zhang et al., DINO, 2023, sec. 3.3) ->
        (detached reference boxes (B,n,4), content queries (B,n,d), enc_outputs of the top Q selected cells).
        ``n``: the number of queries decoded (Q, or Q + the one-to-many group's, which takes the next cells)."""
        props, valid = self.proposals(masks, dtype)
        feats = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))
        enc_logits = self.enc_class_embed(feats)  # (B, S, K or K+1)
        enc_boxes = self.enc_bbox_embed(feats) + inverse_sigmoid(props)  # unnormalised (logit space)
        if self.sigmoid:
            score = enc_logits.amax(-1)
        else:
            score = enc_logits.softmax(-1)[..., :-1].amax(-1)
        score = score.masked_fill(~valid, float("-inf"))
        k = min(n, score.shape[1])
        if k < n:
            extra = f" + hybrid.num_queries={n - self.num_queries}" if n > self.num_queries else ""
            raise ValueError(
                f"two-stage selection: the feature maps have {score.shape[1]} cells, fewer than "
                f"model.num_queries={self.num_queries}{extra}; use larger images or fewer queries"
            )
        index = score.topk(k, dim=1).indices  # (B, n); cells past the valid ones only if too few are valid
        sel_logits = enc_logits.gather(1, index[..., None].expand(-1, -1, enc_logits.shape[-1]))
        sel_boxes = enc_boxes.gather(1, index[..., None].expand(-1, -1, 4))
        q = self.num_queries
        enc_outputs = {"pred_logits": sel_logits[:, :q], "pred_boxes": sel_boxes[:, :q].sigmoid()}
        reference = sel_boxes.detach().sigmoid()
        if self.mixed_query_selection:
            tgt = self._group_weight("content", n)[None].expand(memory.shape[0], -1, -1)
        else:
            embed = sine_box_embedding(reference, self.d_model // 2).to(dtype)
            tgt = self.pos_trans_norm(self.pos_trans(embed))
        return reference, tgt, enc_outputs

    def _decode(
        self,
        tgt: torch.Tensor,
        reference: torch.Tensor,
        memory: torch.Tensor,
        shapes: list[list[int]],
        starts: list[int],
        pad: torch.Tensor,
        ratios: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decoder with reference boxes refined layer by layer -> per-layer logits and boxes."""
        ratios4 = torch.cat((ratios, ratios), -1)[:, None]  # (B, 1, L, 4): (cx, cy, w, h) scale alike
        ref = reference  # detached reference of the current layer
        previous = reference  # undetached box of the previous layer (look forward twice)
        logits, boxes = [], []
        for i, layer in enumerate(self.decoder):
            query_pos = self.query_pos_head(sine_box_embedding(ref, self.d_model // 2).to(memory.dtype))
            tgt = layer(tgt, query_pos, ref[:, :, None] * ratios4, memory, shapes, starts, pad, self_attn_mask)
            head = i if self.box_refine else 0
            delta = self.bbox_embed[head](tgt)
            logits.append(self.class_embed[head](tgt))
            box = (delta + inverse_sigmoid(ref)).sigmoid()
            if self.look_forward_twice:
                boxes.append((delta + inverse_sigmoid(previous)).sigmoid())
            else:
                boxes.append(box)
            if self.box_refine:
                previous, ref = box, box.detach()
        return logits, boxes
