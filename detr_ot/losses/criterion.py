"""DETR's set criterion (Carion et al., ECCV 2020, sec. 3.1), written over an Assignment.

For each decoder layer: the pairwise terms (L1, GIoU, matching class cost) are computed once, the matcher
turns them into an :class:`~detr_ot.matching.Assignment` ``S``, and the loss is
``L(S) = sum_ij S_ij l_ij + sum_i S_i0 l0_i`` with
``l_ij = w_cls * cls_ij + (w_bbox * L1_ij + w_giou * (1 - GIoU_ij)) / num_boxes`` and ``l0_i`` the
no-object classification loss. With the hard Hungarian ``S`` this is exactly DETR's loss; a soft or
Generalized-Update ``S`` plugs in unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from detr_ot import distributed as dist
from detr_ot.losses.classification import ClassificationLoss
from detr_ot.matching import Assignment, Matcher, PaddedTargets, compute_pairwise_terms


class SetCriterion(nn.Module):
    """Matches every decoder layer on its own and sums the weighted losses of all layers.

    Returns a dict with the unweighted terms (``loss_cls``, ``loss_bbox``, ``loss_giou``; suffix ``_i``
    for the i-th auxiliary layer), the logging metrics ``class_error`` and ``cardinality_error`` of the last
    layer, and ``loss``: the weighted total that is back-propagated.
    """

    def __init__(
        self,
        matcher: Matcher,
        cls_loss: ClassificationLoss,
        num_classes: int,
        class_cost: str,
        cls_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.cls_loss = cls_loss
        self.num_classes = num_classes
        self.class_cost = class_cost
        self.weights = {"loss_cls": cls_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}

    def layer_losses(
        self, outputs: dict, targets: PaddedTargets, num_boxes: float
    ) -> tuple[dict[str, torch.Tensor], Assignment]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        terms = compute_pairwise_terms(logits, boxes.float(), targets, self.class_cost)
        assignment = self.matcher(terms)
        cls = self.cls_loss(logits, assignment, targets, num_boxes, terms=terms)
        # DETR's box weights S / num_boxes, unless the classification loss re-weights the boxes (RS, aLRP)
        weights = assignment.to_gt / num_boxes if cls.box_weights is None else cls.box_weights
        scale = cls.box_scale
        losses = {
            "loss_cls": cls.loss,
            "loss_bbox": (weights * terms.l1).sum() * scale,
            "loss_giou": (weights * (1 - terms.giou) * targets.mask[:, None, :]).sum() * scale,
        }
        return losses, assignment

    @torch.no_grad()
    def metrics(self, outputs: dict, targets: PaddedTargets, assignment: Assignment) -> dict[str, torch.Tensor]:
        """DETR's logging metrics: classification error (%) of the matched queries and the cardinality
        error (absolute difference between predicted and true object counts, averaged over images)."""
        logits = outputs["pred_logits"]
        b, q, g = assignment.matched_pairs()
        if len(b):
            predicted = logits[b, q, : self.num_classes].argmax(-1)
            accuracy = (predicted == targets.labels[b, g]).float().mean() * 100
        else:
            accuracy = torch.tensor(100.0, device=logits.device)
        if self.cls_loss.head == "softmax":
            is_object = logits.argmax(-1) != logits.shape[-1] - 1
        else:
            is_object = logits.sigmoid().amax(-1) > 0.5
        card = (is_object.sum(1).float() - targets.mask.sum(1).float()).abs().mean()
        return {"class_error": 100 - accuracy, "cardinality_error": card}

    def synchronize_state(self) -> None:
        """Collective: make the classification loss's running state (aLRP's self-balance window) the same on
        every process, so that rank 0's checkpoint resumes every rank exactly."""
        self.cls_loss.synchronize_state()

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        padded = PaddedTargets.from_list(targets, device)
        num_boxes = dist.global_num_boxes(padded.num_boxes, device)
        layers = [(outputs, "")] + [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:  # two-stage encoder proposals (Deformable DETR): one more layer
            layers.append((outputs["enc_outputs"], "_enc"))
        result: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)
        for layer, suffix in layers:
            losses, assignment = self.layer_losses(layer, padded, num_boxes)
            for name, value in losses.items():
                result[name + suffix] = value
                total = total + self.weights[name] * value
            if suffix == "":
                result.update(self.metrics(layer, padded, assignment))
        result["loss"] = total
        return result
