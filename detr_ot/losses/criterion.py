"""DETR's set criterion (Carion et al., ECCV 2020, sec. 3.1), written over an Assignment.

For each decoder layer: the pairwise terms (L1, GIoU, matching class cost) are computed once, the matcher
turns them into an :class:`~detr_ot.matching.Assignment` ``S``, and the loss is
``L(S) = sum_ij S_ij l_ij + sum_i S_i0 l0_i`` with
``l_ij = w_cls * cls_ij + (w_bbox * L1_ij + w_giou * (1 - GIoU_ij)) / num_boxes`` and ``l0_i`` the
no-object classification loss. With the hard Hungarian ``S`` this is exactly DETR's loss; a soft or
Generalized-Update ``S`` plugs in unchanged.

One-to-many plans (ground truth j's column summing to k_j, :mod:`detr_ot.matching.supply`) go through the same
code: every loss reads its positives and weights from ``S``. The only decision is the normaliser ``num_boxes``
(``normalizer``): ``objects``, DETR's number of ground truths, or ``positives``, the plan's ground-truth mass
``sum_ij S_ij`` (``sum_j k_j`` for a hard one-to-many plan, which is what H-DETR's one-to-many branch divides
by when it repeats the targets k times; Jia et al., CVPR 2023, eq. 5). Both are summed over processes and
divided by the world size, so W processes of batch b take the gradient of one process of batch W*b. For a
one-to-one plan that matches every ground truth the two are equal. A plan with column mass 2 on ground truth
j and ``positives`` gives exactly the losses of a one-to-one plan on the target list with j listed twice
(tests/test_hybrid.py).
"""

from __future__ import annotations

import torch
from torch import nn

from detr_ot import distributed as dist
from detr_ot.losses.classification import ClassificationLoss
from detr_ot.matching import Assignment, Matcher, PaddedTargets, PairwiseTerms, compute_pairwise_terms

NORMALIZERS = ("objects", "positives")


class SetCriterion(nn.Module):
    """Matches every decoder layer on its own and sums the weighted losses of all layers.

    Returns a dict with the unweighted terms (``loss_cls``, ``loss_bbox``, ``loss_giou``; suffix ``_i``
    for the i-th auxiliary layer), the logging metrics ``class_error`` and ``cardinality_error`` of the last
    layer, and ``loss``: the weighted total that is back-propagated. ``normalizer``: ``objects`` or
    ``positives`` (module docstring).
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
        normalizer: str = "objects",
    ) -> None:
        super().__init__()
        if normalizer not in NORMALIZERS:
            raise ValueError(f"loss.normalizer={normalizer!r}: use one of {list(NORMALIZERS)}")
        self.normalizer = normalizer
        self.matcher = matcher
        self.cls_loss = cls_loss
        self.num_classes = num_classes
        self.class_cost = class_cost
        self.weights = {"loss_cls": cls_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}

    def match(self, outputs: dict, targets: PaddedTargets) -> tuple[PairwiseTerms, Assignment]:
        """One layer's pairwise terms and the matcher's Assignment on them."""
        terms = compute_pairwise_terms(outputs["pred_logits"], outputs["pred_boxes"].float(), targets, self.class_cost)
        return terms, self.matcher(terms)

    def layer_losses(
        self,
        outputs: dict,
        targets: PaddedTargets,
        num_boxes: float | torch.Tensor,
        matched: tuple[PairwiseTerms, Assignment] | None = None,
    ) -> tuple[dict[str, torch.Tensor], Assignment]:
        """One layer's unweighted losses (and its Assignment), matched here unless ``matched`` is given."""
        logits = outputs["pred_logits"]
        terms, assignment = self.match(outputs, targets) if matched is None else matched
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

    def num_boxes(
        self, targets: PaddedTargets, assignments: list[Assignment], device: torch.device
    ) -> list[float]:
        """Every layer's normaliser, this process's share ``max(Z, 1) / world_size`` of the global ``Z``:
        the number of ground truths (``objects``, the same for every layer), or each layer's plan mass on the
        ground truths (``positives``; every layer in one collective and one host sync, as for ``objects``)."""
        if self.normalizer == "objects":
            return [dist.global_num_boxes(targets.num_boxes, device)] * len(assignments)
        mass = torch.stack([a.to_gt.detach().sum(dtype=torch.float64) for a in assignments])
        return dist.global_normalizer(mass, minimum=1.0).tolist()

    def synchronize_state(self) -> None:
        """Collective: make the classification loss's running state (aLRP's self-balance window) the same on
        every process, so that rank 0's checkpoint resumes every rank exactly."""
        self.cls_loss.synchronize_state()

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        padded = PaddedTargets.from_list(targets, device)
        layers = [(outputs, "")] + [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:  # two-stage encoder proposals (Deformable DETR): one more layer
            layers.append((outputs["enc_outputs"], "_enc"))
        matched = [self.match(layer, padded) for layer, _ in layers]
        normalizers = self.num_boxes(padded, [assignment for _, assignment in matched], device)
        result: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)
        for (layer, suffix), match, num_boxes in zip(layers, matched, normalizers, strict=True):
            losses, assignment = self.layer_losses(layer, padded, num_boxes, matched=match)
            for name, value in losses.items():
                result[name + suffix] = value
                total = total + self.weights[name] * value
            if suffix == "":
                result.update(self.metrics(layer, padded, assignment))
        result["loss"] = total
        return result
