"""Batched pairwise IoU / GIoU against torchvision, and their behaviour on degenerate boxes."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou, generalized_box_iou

from detr_ot.boxes import cxcywh_to_xyxy, pairwise_giou, pairwise_iou_giou


def random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    return cxcywh_to_xyxy(torch.cat([torch.rand(n, 2, generator=gen), torch.rand(n, 2, generator=gen) * 0.5 + 0.01], 1))


def test_batched_iou_and_giou_equal_torchvision() -> None:
    gen = torch.Generator().manual_seed(0)
    b1 = torch.stack([random_boxes(7, gen) for _ in range(3)]).double()
    b2 = torch.stack([random_boxes(4, gen) for _ in range(3)]).double()
    iou, giou = pairwise_iou_giou(b1, b2)
    for b in range(3):
        torch.testing.assert_close(iou[b], box_iou(b1[b], b2[b]), rtol=0, atol=1e-12)
        torch.testing.assert_close(giou[b], generalized_box_iou(b1[b], b2[b]), rtol=0, atol=1e-12)
    torch.testing.assert_close(pairwise_giou(b1, b2), giou)


def test_collapsed_box_against_a_padded_column_stays_finite_with_finite_gradients() -> None:
    """A predicted box of zero area against an all-zero (padded) ground truth: 0 / 0 without the clamps. The
    gradient must stay finite even though the padded entry is masked out afterwards (0 * NaN is NaN)."""
    pred = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]]], requires_grad=True)
    gt = torch.tensor([[[0.1, 0.1, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0]]])
    iou, giou = pairwise_iou_giou(pred, gt)
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    mask = torch.tensor([1.0, 0.0])
    ((iou + giou) * mask).sum().backward()
    assert torch.isfinite(pred.grad).all()
    # real pairs are untouched by the clamps
    torch.testing.assert_close(giou[0, 1, 0], generalized_box_iou(pred[0, 1:].detach(), gt[0, :1])[0, 0])
