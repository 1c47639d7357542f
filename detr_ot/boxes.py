"""Box conversions and (generalised) IoU, on top of torchvision.ops."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, generalized_box_iou

_MIN_AREA = 1e-7  # in normalised image units: a 0.03% x 0.03% box


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def pairwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU (Rezatofighi et al., CVPR 2019) between every box of ``boxes1`` (B, N, 4) and ``boxes2``
    (B, M, 4), both xyxy; returns (B, N, M) (2-D inputs give (N, M))."""
    if boxes1.dim() == 2:
        return generalized_box_iou(boxes1, boxes2)
    if boxes1.dim() != 3:
        raise ValueError(f"pairwise_giou expects (N,4) or (B,N,4) boxes, got {tuple(boxes1.shape)}")
    return _batched_giou(boxes1, boxes2)


def pairwise_iou_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU, GIoU), each (B, N, M), between xyxy boxes (B, N, 4) and (B, M, 4), sharing the intersection."""
    return _batched_giou(boxes1, boxes2, with_iou=True)  # type: ignore[return-value]


def _batched_giou(
    b1: torch.Tensor, b2: torch.Tensor, with_iou: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.maximum(b1[:, :, None, :2], b2[:, None, :, :2])
    rb = torch.minimum(b1[:, :, None, 2:], b2[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    # The clamps only act on degenerate pairs, e.g. a collapsed predicted box against a padded (all-zero)
    # ground-truth column: without them 0 / 0 gives NaN in the forward and, through the masked entries, in the
    # backward whenever the matching cost itself is differentiated (gu, sinkhorn).
    union = (area1[:, :, None] + area2[:, None, :] - inter).clamp(min=_MIN_AREA)
    iou = inter / union
    lt_c = torch.minimum(b1[:, :, None, :2], b2[:, None, :, :2])
    rb_c = torch.maximum(b1[:, :, None, 2:], b2[:, None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1).clamp(min=_MIN_AREA)
    giou = iou - (hull - union) / hull
    return (iou, giou) if with_iou else giou
