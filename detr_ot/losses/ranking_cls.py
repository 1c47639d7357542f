"""AP, aLRP and RS Loss as DETR classification losses (``loss.cls=ap|alrp|rs``).

The losses themselves (values and error-driven updates) are in :mod:`detr_ot.losses.ranking`; this module
turns an :class:`~detr_ot.matching.Assignment` into their inputs and wires their box-loss weighting into
the set criterion.

Positives: for every matched (query, ground truth) pair, the sigmoid logit of the ground truth's class
(a soft plan uses each query's largest column); every other (query, class) logit is a negative. Ranking
groups: the whole batch of the process (``group: batch``, default) or each image (``group: image``); each
decoder layer is its own group set, matched on its own.

Matching with ranking losses. Ranking losses are invariant to a common shift of the logits, so the
sigmoid probabilities that DETR's (and the focal) matching cost reads are not calibrated. The default adds
a small auxiliary sigmoid focal term (``aux_focal``, weight 0.1 of the classification loss) that keeps the
logits calibrated, and matches with the focal class cost. ``aux_focal: 0`` with ``matcher.class_cost=logit``
is the pure alternative. (Design choice of this toolkit, not of the papers.)

Distributed training. A ranking group never spans processes (with ``group: batch`` each process ranks its
own batch), but every normaliser is global: the loss is the mean over the ranking groups of *all* processes
that hold positives, RS normalises its box weights by the score sum of all processes' positives and balances
the box loss by the global values, and aLRP's self-balance averages over processes. So with ``group: image``
W processes of batch b take exactly the steps of one process of batch W*b (tests/test_distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import sigmoid_focal_loss

from detr_ot import distributed as dist
from detr_ot.losses import ranking
from detr_ot.losses.classification import CLASSIFICATION_LOSSES, ClassificationLoss, ClassificationResult
from detr_ot.matching import Assignment, PaddedTargets, PairwiseTerms


@dataclass
class RankingOptions:
    """Config keys ``loss.<ap|alrp|rs>.<field>``: ``delta`` of the smoothed step, ``group`` (batch | image),
    ``aux_focal`` weight of the calibrating focal term, ``max_chunk_mb`` bound on P x P intermediates."""

    delta: float = 1.0
    group: str = "batch"
    aux_focal: float = 0.1
    max_chunk_mb: int = 256

    def __post_init__(self) -> None:
        if self.group not in ("batch", "image"):
            raise ValueError(f"group={self.group!r}: use batch or image")
        if self.delta <= 0:
            raise ValueError(f"delta={self.delta} must be > 0")


@dataclass
class RSOptions(RankingOptions):
    """Plus ``box_scale``: the box loss is balanced to ``box_scale`` times the RS Loss value.

    The paper balances to 1x (``box_scale: 1``). This toolkit's default is 3: DETR's box terms (5 L1 + 2 GIoU
    against a classification weight of 1-2) carry about three times the classification loss (the comparison of
    both settings is in the README, "Classification losses at full length"). A choice of this toolkit, not of
    the paper."""

    delta: float = 0.5
    box_scale: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.box_scale < 0:
            raise ValueError(f"box_scale={self.box_scale} must be >= 0")


@dataclass
class ALRPOptions(RankingOptions):
    """Plus the self-balance weight: initial ``sb_init`` (50), re-estimated every ``sb_period`` iterations."""

    sb_init: float = 50.0
    sb_period: int = 1000


class _PositivesMixin:
    """Positives, grouping and the auxiliary focal term shared by the three losses."""

    options: RankingOptions

    def positives(
        self, logits: torch.Tensor, assignment: Assignment, targets: PaddedTargets
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pos_mask B x Q x K, batch idx, query idx, gt idx) with the pairs in row-major (b, q) order."""
        b, q, g = assignment.matched_pairs()
        order = torch.argsort(b * logits.shape[1] + q)
        b, q, g = b[order], q[order], g[order]
        pos = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        pos[b, q, targets.labels[b, g]] = True
        return pos, b, q, g

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1) if self.options.group == "batch" else x.flatten(1)

    def group_count(self, pos: torch.Tensor) -> torch.Tensor:
        """Number of this process's ranking groups with at least one positive (float64)."""
        return self.grouped(pos).any(-1).sum().to(torch.float64)

    def group_normalizer(self, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Divides the sum of the per-group losses: ``max(groups with positives, 1)``, counted over all
        processes and divided by the world size (see the module docstring)."""
        return dist.global_normalizer(self.group_count(pos), minimum=1.0).to(dtype)

    def aux_focal_term(self, logits: torch.Tensor, pos: torch.Tensor, num_boxes: float) -> torch.Tensor:
        if self.options.aux_focal <= 0:
            return logits.sum() * 0.0
        focal = sigmoid_focal_loss(logits.float(), pos.float(), 0.25, 2.0, reduction="sum") / num_boxes
        return self.options.aux_focal * focal

    def pair_weights(self, like: torch.Tensor, b: torch.Tensor, q: torch.Tensor, g: torch.Tensor,
                     w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        out[b, q, g] = w.to(out.dtype)
        return out


@CLASSIFICATION_LOSSES.register("ap", options=RankingOptions)
class APLoss(_PositivesMixin, ClassificationLoss):
    """AP Loss (Chen et al., CVPR 2019; TPAMI 2020) on the sigmoid logits, with its error-driven update
    (:func:`detr_ot.losses.ranking.ap_loss`). Box losses stay DETR's."""

    head = "sigmoid"
    class_cost = "focal"

    def __init__(self, options: RankingOptions | None = None) -> None:
        super().__init__()
        self.options = options or RankingOptions()

    def forward(self, logits: torch.Tensor, assignment: Assignment, targets: PaddedTargets, num_boxes: float,
                terms: PairwiseTerms | None = None) -> ClassificationResult:
        pos, *_ = self.positives(logits, assignment, targets)
        loss = ranking.ap_loss(self.grouped(logits), self.grouped(pos), self.options.delta, reduction="sum",
                               max_chunk_bytes=self.options.max_chunk_mb * 2**20)
        loss = loss / self.group_normalizer(pos, loss.dtype)
        return ClassificationResult(loss + self.aux_focal_term(logits, pos, num_boxes))


@CLASSIFICATION_LOSSES.register("rs", options=RSOptions)
class RSLoss(_PositivesMixin, ClassificationLoss):
    """RS Loss (Oksuz et al., ICCV 2021; :func:`detr_ot.losses.ranking.rs_loss`): ranking plus sorting by
    the (detached) IoU of each positive's box. Box losses are weighted per positive by its detached top
    score (normalised to sum 1) and balanced by value: ``L_box <- L_box * box_scale * L_RS / L_box`` (detached
    ratio; ``box_scale`` 1 in the paper, 3 by default here, see :class:`RSOptions`)."""

    head = "sigmoid"
    class_cost = "focal"
    reweights_boxes = True

    def __init__(self, bbox_weight: float, giou_weight: float, options: RSOptions | None = None) -> None:
        super().__init__()
        self.bbox_weight, self.giou_weight = bbox_weight, giou_weight
        self.options = options or RSOptions()

    def forward(self, logits: torch.Tensor, assignment: Assignment, targets: PaddedTargets, num_boxes: float,
                terms: PairwiseTerms | None = None) -> ClassificationResult:
        assert terms is not None and terms.iou is not None, "RS Loss needs the pairwise IoU"
        pos, b, q, g = self.positives(logits, assignment, targets)
        ious = terms.iou[b, q, g].detach().clamp(0, 1)
        loss = ranking.rs_loss(self.grouped(logits), self.grouped(pos), ious, self.options.delta, reduction="sum",
                               max_chunk_bytes=self.options.max_chunk_mb * 2**20)
        top = ranking.rs_top_scores(logits[b, q]).double()
        pair_box = (self.bbox_weight * terms.l1 + self.giou_weight * (1 - terms.giou))[b, q, g].detach().double()
        # One collective: [groups with positives, score sum, summed RS loss, score-weighted box loss].
        local = torch.stack([self.group_count(pos), top.sum(), loss.detach().double(), (top * pair_box).sum()])
        n_all, top_all, loss_all, box_all = dist.all_reduce_sum(local).unbind()
        world = dist.world_size()
        top_norm = torch.where(top_all > 1e-10, top_all, torch.ones_like(top_all))  # rs_box_weights' guard
        weights = self.pair_weights(terms.l1, b, q, g, top * world / top_norm)
        mean_loss, mean_box = loss_all / n_all.clamp_min(1.0), box_all / top_norm
        scale = torch.where(mean_box > 1e-12, mean_loss / mean_box.clamp(min=1e-12), torch.zeros_like(mean_box))
        scale = scale * self.options.box_scale
        loss = loss / (n_all.clamp_min(1.0) / world).to(loss.dtype)
        return ClassificationResult(loss + self.aux_focal_term(logits, pos, num_boxes), weights, scale.to(loss.dtype))


@CLASSIFICATION_LOSSES.register("alrp", options=ALRPOptions)
class ALRPLoss(_PositivesMixin, ClassificationLoss):
    """aLRP Loss (Oksuz et al., NeurIPS 2020; :func:`detr_ot.losses.ranking.alrp_loss`): the classification part
    with its error-driven update, and the localisation part ``L_loc = sum_i w_i E_loc(i)`` with the ranking
    weights ``w_i``, scaled by the self-balance weight ``w_SB`` (averaged across processes, saved in
    checkpoints). ``E_loc`` is the box loss of the positive, ``(w_bbox L1 + w_giou (1 - GIoU)) / (w_bbox +
    2 w_giou)`` so it lies in about [0, 1]; the classification part uses ``(1 - GIoU) / 2`` as the paper."""

    head = "sigmoid"
    class_cost = "focal"
    reweights_boxes = True

    def __init__(self, bbox_weight: float, giou_weight: float, options: ALRPOptions | None = None) -> None:
        super().__init__()
        self.bbox_weight, self.giou_weight = bbox_weight, giou_weight
        self.options = options or ALRPOptions()
        self.balance = ranking.SelfBalance(self.options.sb_init, self.options.sb_period)

    def get_extra_state(self) -> dict:
        return self.balance.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.balance.load_state_dict(state)

    def synchronize_state(self) -> None:
        self.balance.synchronize()

    def forward(self, logits: torch.Tensor, assignment: Assignment, targets: PaddedTargets, num_boxes: float,
                terms: PairwiseTerms | None = None) -> ClassificationResult:
        assert terms is not None, "aLRP Loss needs the pairwise GIoU"
        pos, b, q, g = self.positives(logits, assignment, targets)
        loc_error = ((1 - terms.giou[b, q, g]) / 2).detach()
        loss, w = ranking.alrp_loss(self.grouped(logits), self.grouped(pos), loc_error, self.options.delta,
                                    reduction="sum", max_chunk_bytes=self.options.max_chunk_mb * 2**20)
        z = self.group_normalizer(pos, loss.dtype)
        loss = loss / z
        weights = self.pair_weights(terms.l1, b, q, g, w.detach() / z.to(w.dtype))
        norm = self.bbox_weight + 2 * self.giou_weight
        loc = (weights * (self.bbox_weight * terms.l1 + self.giou_weight * (1 - terms.giou))).sum().detach() / norm
        if self.training and torch.is_grad_enabled():
            self.balance.update(loss.detach(), loc)
            self.balance.step()
        loss = loss + self.aux_focal_term(logits, pos, num_boxes)
        return ClassificationResult(loss, weights, self.balance.weight / norm)
