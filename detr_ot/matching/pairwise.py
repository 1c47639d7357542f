"""Pairwise terms between every query and every ground truth of its image, computed once per decoder
layer and shared by the matcher's cost and the criterion's loss (see shared/ARCHITECTURE.md).

Everything is padded over the images of a batch: B x Q x Mmax with a ground-truth mask, never DETR's full
(B*Q) x sum(T) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from detr_ot.boxes import cxcywh_to_xyxy, pairwise_iou_giou


class NonFiniteCostError(FloatingPointError):
    """A matching cost went NaN/inf; the message names the image and the cost term."""


@dataclass
class PaddedTargets:
    """Ground truths of a batch, padded to the largest image: boxes B x M x 4 (cxcywh, normalised),
    labels B x M (0 where padded), mask B x M (True for real boxes)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    image_ids: list[int]

    @classmethod
    def from_list(cls, targets: list[dict], device: torch.device | str) -> PaddedTargets:
        batch = len(targets)
        counts = [len(t["labels"]) for t in targets]
        m = max(counts, default=0)
        boxes = torch.zeros(batch, m, 4, device=device)
        labels = torch.zeros(batch, m, dtype=torch.long, device=device)
        mask = torch.zeros(batch, m, dtype=torch.bool, device=device)
        for b, (t, n) in enumerate(zip(targets, counts, strict=True)):  # one copy per image, not per box
            boxes[b, :n] = t["boxes"].to(device)
            labels[b, :n] = t["labels"].to(device)
            mask[b, :n] = True
        ids = [int(t["image_id"]) if "image_id" in t else -1 for t in targets]
        return cls(boxes, labels, mask, ids)

    @property
    def num_boxes(self) -> int:
        return int(self.mask.sum())


@dataclass
class PairwiseTerms:
    """Query x ground-truth terms of one decoder layer (all B x Q x M, padded columns hold zeros).

    ``l1``: L1 distance of cxcywh boxes (summed over the 4 coordinates); ``giou``: generalised IoU;
    ``class_cost``: the matcher's class term (DETR: ``-p_i(c_j)``; focal-style for sigmoid heads);
    ``iou``: plain IoU (box quality targets of ranking losses).
    None of them is detached: the matcher decides whether its cost carries a gradient.
    """

    l1: torch.Tensor
    giou: torch.Tensor
    class_cost: torch.Tensor
    gt_mask: torch.Tensor
    image_ids: list[int]
    iou: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.l1.shape)  # type: ignore[return-value]


def class_cost_term(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """The class part of the matching cost, B x Q x M.

    ``prob``: ``-softmax(logits)[c_j]`` (DETR, Carion et al. 2020). ``focal``: the focal-loss difference
    ``FL(p, 1) - FL(p, 0)`` at the target class (Deformable DETR, Zhu et al. 2021), for sigmoid heads.
    ``sigmoid_prob``: ``-sigmoid(logit)[c_j]``. ``logit``: ``-logit[c_j]`` (shift-invariant heads, e.g. ranking
    losses).
    """
    index = labels[:, None, :].expand(-1, logits.shape[1], -1)
    if kind == "prob":
        return -logits.softmax(-1).gather(2, index)
    if kind == "logit":
        return -logits.gather(2, index)
    prob = logits.sigmoid().gather(2, index)
    if kind == "sigmoid_prob":
        return -prob
    if kind == "focal":
        neg = (1 - alpha) * prob.pow(gamma) * -torch.log1p(-prob + 1e-8)
        pos = alpha * (1 - prob).pow(gamma) * -torch.log(prob + 1e-8)
        return pos - neg
    raise ValueError(f"unknown class cost kind {kind!r}; use prob, focal, sigmoid_prob or logit")


def compute_pairwise_terms(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: PaddedTargets,
    class_cost: str = "prob",
) -> PairwiseTerms:
    """L1, GIoU and the class cost between every query and every ground truth of its image."""
    gt_boxes = targets.boxes.to(pred_boxes.dtype)
    l1 = torch.cdist(pred_boxes, gt_boxes, p=1)  # sum of |differences|, without a B x Q x M x 4 intermediate
    iou, giou = pairwise_iou_giou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(gt_boxes))
    cls = class_cost_term(pred_logits, targets.labels, class_cost)
    keep = targets.mask[:, None, :]
    zero = torch.zeros((), dtype=l1.dtype, device=l1.device)
    return PairwiseTerms(
        l1=torch.where(keep, l1, zero),
        giou=torch.where(keep, giou, zero),
        class_cost=torch.where(keep, cls.to(l1.dtype), zero),
        gt_mask=targets.mask,
        image_ids=targets.image_ids,
        iou=torch.where(keep, iou, zero),
    )


@dataclass
class CostWeights:
    """Weights of the matching cost ``C = w_class * class + w_bbox * L1 + w_giou * (-GIoU)``."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


def matching_cost(terms: PairwiseTerms, weights: CostWeights, detach: bool) -> torch.Tensor:
    """The weighted matching cost B x Q x M; raises :class:`NonFiniteCostError` naming the image and the
    term when any real (unpadded) entry is NaN or infinite."""
    parts = {
        "class": weights.cost_class * terms.class_cost,
        "bbox_l1": weights.cost_bbox * terms.l1,
        "giou": -weights.cost_giou * terms.giou,
    }
    cost = parts["class"] + parts["bbox_l1"] + parts["giou"]
    if detach:
        cost = cost.detach()
    bad = ~torch.isfinite(cost) & terms.gt_mask[:, None, :]
    if bool(bad.any()):
        image = int(bad.flatten(1).any(1).nonzero()[0])
        which = [name for name, p in parts.items() if not torch.isfinite(p[image][bad[image]]).all()]
        raise NonFiniteCostError(
            f"non-finite matching cost for image id {terms.image_ids[image]} (batch index {image}) in term(s) "
            f"{which or ['sum']}: check the model outputs (pred_logits/pred_boxes) for NaN/inf"
        )
    return cost
