"""Query groups: the one-to-one queries and an extra one-to-many group decoded in one pass, blind to each other.

Hybrid matching (Jia, Yuan, He, Wu, Yu, Lin, Sun, Zhang, Hu, "DETRs with Hybrid Matching", CVPR 2023, sec. 3.2,
"hybrid branch scheme", eqs. 4-6): beside the ``Q`` one-to-one queries a second group of ``Q'`` queries shares
every layer and head of the decoder but is trained with a one-to-many assignment (each ground truth repeated
``k`` times). A block-diagonal self-attention mask keeps each query from attending to the other group, so the
one-to-one queries compute exactly what they would compute alone (self-attention is the only place where
decoder queries meet; cross-attention, FFN and the heads act on each query by itself). The extra group exists
only in training: in eval mode it is not even computed and the outputs are the one-to-one model's.

The model stacks both groups along the query axis (one-to-one first); :meth:`QueryGroups.split` cuts the
per-layer outputs back into the usual outputs dict, with the extra group's own dict under ``"one_to_many"``
(``pred_logits``, ``pred_boxes``, ``aux_outputs``), which the hybrid criterion (:mod:`detr_ot.losses.hybrid`)
matches with its one-to-many matcher.
"""

from __future__ import annotations

import torch

ONE_TO_MANY = "one_to_many"  # key of the extra group's outputs in the model's outputs dict


def layer_outputs(logits: torch.Tensor, boxes: torch.Tensor, aux_loss: bool) -> dict:
    """Per-layer stacks (L, B, Q, ·) -> ``{pred_logits, pred_boxes}`` of the last layer, plus the earlier layers
    as ``aux_outputs`` when ``aux_loss``."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [
            {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
        ]
    return out


class QueryGroups:
    """The sizes of the two query groups: ``num_queries`` one-to-one queries and ``num_extra`` one-to-many
    queries (0: no extra group, the plain model)."""

    def __init__(self, num_queries: int, num_extra: int = 0) -> None:
        if num_queries < 1:
            raise ValueError(f"model.num_queries={num_queries} must be >= 1")
        if num_extra < 0:
            raise ValueError(f"hybrid.num_queries={num_extra} must be >= 0 (0: no one-to-many group)")
        self.num_queries = num_queries
        self.num_extra = num_extra

    def __repr__(self) -> str:
        return f"QueryGroups(one_to_one={self.num_queries}, one_to_many={self.num_extra})"

    def active(self, training: bool) -> int:
        """How many queries to decode: both groups in training, the one-to-one queries alone at inference."""
        return self.num_queries + self.num_extra if training else self.num_queries

    def self_attn_mask(self, total: int, device: torch.device | str) -> torch.Tensor | None:
        """Boolean (total, total) mask for the decoder's self-attention, True where attention is blocked: each
        group attends to itself only (H-DETR's block-diagonal mask). None when only one group is decoded."""
        if total == self.num_queries:
            return None
        if total != self.num_queries + self.num_extra:
            raise ValueError(f"{self!r}: {total} queries decoded, expected {self.num_queries} or "
                             f"{self.num_queries + self.num_extra}")
        group = torch.arange(total, device=device) >= self.num_queries
        return group[:, None] != group[None, :]

    def split(self, logits: torch.Tensor, boxes: torch.Tensor, aux_loss: bool) -> dict:
        """Per-layer stacks (L, B, total, ·) -> the one-to-one outputs dict, with the extra group's outputs under
        ``"one_to_many"`` when it was decoded."""
        q = self.num_queries
        out = layer_outputs(logits[:, :, :q], boxes[:, :, :q], aux_loss)
        if logits.shape[2] > q:
            out[ONE_TO_MANY] = layer_outputs(logits[:, :, q:], boxes[:, :, q:], aux_loss)
        return out
