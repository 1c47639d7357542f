"""How many queries each ground truth takes (its supply k_j), and the exact one-to-many assignment.

One-to-many is still one :class:`Assignment` (shared/ARCHITECTURE.md): ground truth j's column carries mass k_j,
every query row still sums to 1, and the background column takes the rest, ``Q - sum_j k_j``.

Supplies (``supply``):
  * ``one``: k_j = 1 (DETR's one-to-one matching);
  * ``fixed``: k_j = k (H-DETR's one-to-many branch repeats every ground truth k = 6 times; Jia et al.,
    "DETRs with Hybrid Matching", CVPR 2023);
  * ``dynamic``: OTA's dynamic k estimation (Ge, Liu, Li, Yoshie, Sun, "OTA: Optimal Transport Assignment for
    Object Detection", CVPR 2021, sec. 3.3): ``k_j = max(1, floor(sum of the top-q IoUs of ground truth j over
    the queries))``, on the detached IoU. Default q = 20, the value of OTA's released COCO configurations
    (``TOP_CANDIDATES``).

When the supplies do not fit (``sum_j k_j > Q`` in an image) they are scaled down with every ground truth
keeping one query: ``k_j <- 1 + floor((k_j - 1) (Q - M) / (sum_j k_j - M))``, so ``sum_j k_j <= Q`` (the floors
of shares of Q - M sum to at most Q - M) and the larger supplies keep the larger shares. Images that fit are
left alone. When even one query per ground truth does not fit (M > Q) the matcher raises.

The exact hard one-to-many assignment (:func:`solve_one_to_many`) is the one-to-one assignment of the cost with
column j replicated k_j times (scipy's ``linear_sum_assignment`` on the Q x sum_j k_j block, per image on the
CPU like :func:`~detr_ot.matching.hungarian.solve_hungarian`): with Q >= sum_j k_j every replica is assigned, so
column j receives exactly k_j queries, and a constant background cost adds the same amount to every such
assignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from detr_ot.matching.assignment import Assignment
from detr_ot.matching.base import MATCHERS, Matcher
from detr_ot.matching.hungarian import hard_plan, solve_hungarian
from detr_ot.matching.pairwise import CostWeights, PairwiseTerms, matching_cost

_SUPPLIES = ("one", "fixed", "dynamic")


@dataclass
class SupplyOptions:
    """The supply keys shared by the matchers that support one-to-many (``matcher.<name>.<field>``).

    supply: ``one`` | ``fixed`` | ``dynamic`` (module docstring).
    k: the supply of every ground truth when ``supply=fixed``.
    topq: q of OTA's dynamic k, the number of best-overlapping queries whose IoUs are summed.
    """

    _name: ClassVar[str] = "supply"
    supply: str = "one"
    k: int = 6
    topq: int = 20

    def __post_init__(self) -> None:
        if self.supply not in _SUPPLIES:
            raise ValueError(f"matcher.{self._name}.supply={self.supply!r}: use one of {list(_SUPPLIES)}")
        if self.k < 1 or self.topq < 1:
            raise ValueError(f"matcher.{self._name}: k={self.k} and topq={self.topq} must be >= 1")


def dynamic_k(iou: torch.Tensor, gt_mask: torch.Tensor, topq: int) -> torch.Tensor:
    """OTA's dynamic k (sec. 3.3): ``max(1, floor(sum of the top-q IoUs over the queries))`` per ground truth,
    B x M int64 (0 on padded columns). ``iou`` B x Q x M is detached here."""
    q = min(topq, iou.shape[1])
    top = iou.detach().double().topk(q, dim=1).values.sum(1)  # float64: a sum of exactly 2 stays 2 here
    k = top.floor().clamp_min(1).to(torch.int64)
    return k * gt_mask


def fit_supplies(k: torch.Tensor, gt_mask: torch.Tensor, queries: int, image_ids: list[int]) -> torch.Tensor:
    """Scale the supplies of images with ``sum_j k_j > Q`` down to fit (module docstring); raise naming the image
    when it has more ground truths than queries."""
    counts = gt_mask.sum(1)
    too_many = counts > queries
    if bool(too_many.any()):
        b = int(too_many.nonzero()[0])
        raise ValueError(
            f"matcher: image id {image_ids[b]} (batch index {b}) has {int(counts[b])} ground truths but only "
            f"{queries} queries; every ground truth needs at least one query (M <= Q)"
        )
    k = k * gt_mask
    total = k.sum(1, keepdim=True)
    over = total > queries
    spare = (queries - counts)[:, None]
    scaled = 1 + ((k - 1) * spare) // (total - counts[:, None]).clamp_min(1)
    return torch.where(over & gt_mask, scaled, k)


def supplies(terms: PairwiseTerms, options: SupplyOptions) -> torch.Tensor:
    """The fitted supplies B x M (int64, 0 on padded columns) of ``options`` for these terms."""
    gt_mask = terms.gt_mask
    batch, queries, m = terms.shape
    if options.supply == "one":
        k = gt_mask.to(torch.int64)
    elif options.supply == "fixed":
        k = gt_mask.to(torch.int64) * options.k
    else:
        if terms.iou is None:
            raise ValueError("matcher supply=dynamic needs the pairwise IoU (PairwiseTerms.iou is None)")
        k = dynamic_k(terms.iou, gt_mask, options.topq)
    return fit_supplies(k, gt_mask, queries, terms.image_ids)


def column_marginals(k: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """B x (M+1) column marginals: the background ``Q - sum_j k_j`` then the supplies."""
    k = k.to(dtype)
    return torch.cat([queries - k.sum(1, keepdim=True), k], dim=1)


def solve_one_to_many(cost: torch.Tensor, k: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """Min-cost assignment in which ground truth j takes exactly ``k[b, j]`` queries and every query at most
    one ground truth, as a hard plan B x Q x (M+1) (column 0: background). ``k`` must fit (``sum_j k_j <= Q``,
    see :func:`fit_supplies`); ground truths are packed first (``gt_mask`` is a prefix mask).

    One device-to-host copy, scipy on each image's cost with column j repeated k_j times, one copy back."""
    if bool((k <= 1).all()):
        return solve_hungarian(cost, gt_mask & (k > 0))
    counts = gt_mask.sum(1).tolist()
    blocks = cost.detach().to("cpu", torch.float64).numpy()
    reps = k.detach().cpu().numpy()
    rows_b, rows_q, cols = [], [], []
    for b, n in enumerate(counts):  # scipy solves one problem per call: the loop is over images only
        if n == 0:
            continue
        replica = np.repeat(np.arange(n), reps[b, :n])
        q_idx, r_idx = linear_sum_assignment(blocks[b][:, replica])
        rows_b.append(np.full(len(q_idx), b))
        rows_q.append(q_idx)
        cols.append(replica[r_idx])
    return hard_plan(cost, rows_b, rows_q, cols)


@dataclass
class OneToManyOptions(SupplyOptions):
    """Config keys ``matcher.one_to_many.<field>``: the supply options, by default H-DETR's k = 6."""

    _name: ClassVar[str] = "one_to_many"
    supply: str = "fixed"


@MATCHERS.register("one_to_many", options=OneToManyOptions)
class OneToManyMatcher(Matcher):
    """Exact one-to-many matching: ground truth j repeated k_j times, min-cost assignment, no gradient (the
    one-to-many branch of hybrid matching, Jia et al., CVPR 2023, with ``supply=fixed, k=6``)."""

    options: OneToManyOptions

    def __init__(self, weights: CostWeights, options: OneToManyOptions | None = None) -> None:
        super().__init__(weights, options or OneToManyOptions())

    def extra_repr(self) -> str:
        o = self.options
        return f"supply={o.supply}, k={o.k}, topq={o.topq}"

    @torch.no_grad()
    def forward(self, terms: PairwiseTerms) -> Assignment:
        if terms.shape[2] == 0:
            return Assignment(plan=self.empty_like(terms), gt_mask=terms.gt_mask, hard=True)
        k = supplies(terms, self.options)
        cost = matching_cost(terms, self.weights, detach=True)
        return Assignment(plan=solve_one_to_many(cost, k, terms.gt_mask), gt_mask=terms.gt_mask, hard=True)
