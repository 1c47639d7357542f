"""Classification losses of the set criterion, and their registry (``loss.cls``).

Every loss reads the :class:`~detr_ot.matching.Assignment`, never the matcher. Losses that decompose over
pairs give, for one image, ``l_ij`` (query i classified as ground truth j's class) and ``l0_i`` (query i as
no-object), so that the set loss is ``sum_ij S_ij l_ij + sum_i S_i0 l0_i`` for any plan ``S`` (hard, soft,
or carrying a Generalized-Update gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from detr_ot import distributed as dist
from detr_ot.matching import Assignment, PaddedTargets, PairwiseTerms
from detr_ot.registry import Registry

CLASSIFICATION_LOSSES: Registry[ClassificationLoss] = Registry("classification loss")


@dataclass
class ClassificationResult:
    """What a classification loss returns: its value ``loss`` and how it weights the box losses.

    ``box_weights`` (B x Q x M, detached) replaces ``S / num_boxes`` in ``sum S_ij l_box_ij / num_boxes``;
    ``None`` keeps DETR's ``S / num_boxes`` (ce, focal, AP). ``box_scale`` (a detached scalar) multiplies both
    box terms (e.g. RS's balance by value, aLRP's w_SB).
    """

    loss: torch.Tensor
    box_weights: torch.Tensor | None = None
    box_scale: torch.Tensor | float = 1.0


class ClassificationLoss(nn.Module):
    """Base class. ``head``: the head it needs (``softmax`` with a no-object logit, or ``sigmoid``).
    ``class_cost``: the matching class cost that suits it (see ``detr_ot.matching.pairwise``).
    ``reweights_boxes``: whether it sets :attr:`ClassificationResult.box_weights` (then its constructor takes
    the criterion's ``bbox_weight`` and ``giou_weight``)."""

    head: ClassVar[str] = "softmax"
    class_cost: ClassVar[str] = "prob"
    reweights_boxes: ClassVar[bool] = False

    def forward(
        self,
        logits: torch.Tensor,
        assignment: Assignment,
        targets: PaddedTargets,
        num_boxes: float,
        terms: PairwiseTerms | None = None,
    ) -> ClassificationResult:
        """The classification loss and its box-loss weighting. ``terms`` are the layer's pairwise terms
        (IoU/GIoU of every pair)."""
        raise NotImplementedError

    def synchronize_state(self) -> None:
        """Make a loss's running state (if any) identical on every process; a collective, called on every
        process before a checkpoint is written. Nothing to do for stateless losses."""


class PairwiseClassificationLoss(ClassificationLoss):
    """A loss of the form ``(sum S_ij l_ij + sum S_i0 l0_i) / Z``."""

    def pairwise(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_pair B x Q x M, l_bg B x Q), before normalisation."""
        raise NotImplementedError

    def normalizer(self, assignment: Assignment, num_boxes: float) -> torch.Tensor | float:
        return num_boxes

    def forward(
        self,
        logits: torch.Tensor,
        assignment: Assignment,
        targets: PaddedTargets,
        num_boxes: float,
        terms: PairwiseTerms | None = None,
    ) -> ClassificationResult:
        l_pair, l_bg = self.pairwise(logits, targets.labels)
        l_pair = l_pair.masked_fill(~targets.mask[:, None, :], 0.0)
        total = (assignment.to_gt * l_pair).sum() + (assignment.to_background * l_bg).sum()
        return ClassificationResult(total / self.normalizer(assignment, num_boxes))


@CLASSIFICATION_LOSSES.register("ce")
class CrossEntropyLoss(PairwiseClassificationLoss):
    """DETR's cross-entropy with a no-object class weighted by ``eos_coef`` (Carion et al. 2020, eq. 2),
    averaged with the class weights as ``F.cross_entropy(weight=...)`` does:
    ``Z = sum_ij S_ij + eos_coef * sum_i S_i0`` (detached). In distributed training ``Z`` is summed over
    the processes (:func:`~detr_ot.distributed.global_normalizer`), so that the processes' averaged
    gradient is the single-process gradient of the whole batch even when their box counts differ."""

    head = "softmax"
    class_cost = "prob"

    def __init__(self, eos_coef: float = 0.1) -> None:
        super().__init__()
        self.eos_coef = eos_coef

    def pairwise(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = logits.float().log_softmax(-1)
        index = labels[:, None, :].expand(-1, logits.shape[1], -1)
        return -logp.gather(2, index), -self.eos_coef * logp[..., -1]

    def normalizer(self, assignment: Assignment, num_boxes: float) -> torch.Tensor:
        plan = assignment.plan.detach()
        return dist.global_normalizer(plan[..., 1:].sum() + self.eos_coef * plan[..., 0].sum())


@CLASSIFICATION_LOSSES.register("focal")
class FocalLoss(PairwiseClassificationLoss):
    """Sigmoid focal loss (Lin et al., ICCV 2017) over every (query, class), normalised by the number of
    boxes as in Deformable DETR (Zhu et al., ICLR 2021):
    ``l0_i = sum_k FL(x_ik, 0)``, ``l_ij = l0_i - FL(x_ic_j, 0) + FL(x_ic_j, 1)``."""

    head = "sigmoid"
    class_cost = "focal"

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def pairwise(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.float()
        alpha, gamma = self.alpha, self.gamma
        l_bg = sigmoid_focal_loss(x, torch.zeros_like(x), alpha, gamma, reduction="none").sum(-1)
        xg = x.gather(2, labels[:, None, :].expand(-1, x.shape[1], -1))
        as_neg = sigmoid_focal_loss(xg, torch.zeros_like(xg), alpha, gamma, reduction="none")
        as_pos = sigmoid_focal_loss(xg, torch.ones_like(xg), alpha, gamma, reduction="none")
        return l_bg[..., None] - as_neg + as_pos, l_bg
