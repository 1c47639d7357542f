"""Entropic optimal-transport matcher with a background supplier column, batched over the images of a batch.

Problem (Cuturi, "Sinkhorn Distances", NeurIPS 2013; Peyre & Cuturi, "Computational Optimal Transport", 2019,
eq. 4.2): for one image with Q queries and M ground truths of supplies k_j (1 for one-to-one matching; see
:mod:`detr_ot.matching.supply`),

    min_{S >= 0}  <S, C> - eps * H(S)   s.t.  sum_j S_ij = a_i = 1  (every query, columns 0..M),
                                              sum_i S_ij = b_j = k_j  (every ground truth j = 1..M),
                                              sum_i S_i0 = b_0 = Q - sum_j k_j  (the background "supplier"),

with C_i0 the background cost. Column 0 absorbs the queries that match nothing, so the problem is balanced
(sum a = sum b = Q) and the plan's rows sum to 1, as :class:`Assignment` requires. The iterations are in
:mod:`detr_ot.matching.balanced`; ``marginals=unbalanced`` relaxes the column marginals by a KL penalty of
strength ``tau`` instead (:mod:`detr_ot.matching.unbalanced`).

Facts used below (all proven by the row/column-shift invariance of the transport polytope: adding r_i to row i
or s_j to column j of C changes <S, C> by the constant sum_i r_i a_i + sum_j s_j b_j):
  * a background cost that is the same for every query is absorbed by the column potential of the background,
    so it changes neither the balanced entropic plan nor the exact one (the unbalanced plan does change);
  * every Sinkhorn iterate is S = diag(e^u) K diag(e^v) (Peyre & Cuturi, Prop. 4.3; for the unbalanced
    iterations too, with the reference measure folded into K), so -log S_ij = C_ij/eps - u_i - v_j + const_ij
    where the constants sum to the same value over every assignment that gives column j exactly k_j queries;
    the most probable such assignment under S (max prod S) is therefore exactly the min-cost one of C, at any
    eps and any iteration count: ``mode="hard"`` rounds with
    :func:`~detr_ot.matching.supply.solve_one_to_many` (:func:`solve_hungarian` for k_j = 1) on the cost
    itself (tested against a brute-force rounding of the plan);
  * as eps -> 0 the entropic plan tends to the (max-entropy) optimal plan (Peyre & Cuturi, Prop. 4.1), which is
    the exact assignment when that is unique (tested).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from detr_ot.matching.assignment import Assignment
from detr_ot.matching.balanced import sinkhorn_log
from detr_ot.matching.base import MATCHERS, Matcher
from detr_ot.matching.implicit import sinkhorn_implicit
from detr_ot.matching.pairwise import CostWeights, PairwiseTerms, matching_cost
from detr_ot.matching.supply import SupplyOptions, column_marginals, solve_one_to_many, supplies
from detr_ot.matching.unbalanced import sinkhorn_unbalanced_log

__all__ = ["SinkhornMatcher", "SinkhornOptions", "sinkhorn_log"]

_NORMALIZE = ("none", "max", "mean")
_MODES = ("soft", "hard")
_GRADIENTS = ("unrolled", "detached", "straight_through", "implicit")
_BACKENDS = ("torch", "pot")
_ANNEAL = ("geometric", "linear")
_MARGINALS = ("balanced", "unbalanced")


@dataclass
class SinkhornOptions(SupplyOptions):
    """Config keys ``matcher.sinkhorn.<field>``.

    supply, k, topq: the supply k_j of every ground truth (:class:`~detr_ot.matching.supply.SupplyOptions`;
        default ``one``: one-to-one).
    epsilon: entropic regularisation (on the normalised cost when ``normalize`` is not ``none``); with
        ``epsilon_start > 0`` it is the value reached at the last epoch.
    epsilon_start: > 0 anneals epsilon from this value (first epoch) to ``epsilon`` (last epoch);
        0 keeps epsilon constant.
    anneal: ``geometric`` (log-linear in the epoch) or ``linear`` schedule.
    iters: maximum number of Sinkhorn iterations (one column + one row update each).
    tol: > 0 stops once the largest column-marginal violation of the batch is below ``tol`` (unbalanced: the
        largest change of the column log-potential), checked every ``check_every`` iterations like POT, one host
        sync per check; 0 runs exactly ``iters`` iterations without a sync.
    normalize: divide each image's cost by its max (``max``) or mean (``mean``) absolute real entry, computed
        on the detached cost so the scale is not differentiated; ``none`` keeps the raw cost.
    background_cost: C_i0, the same for every query (absorbed by the background potential in the balanced
        problem, see the module docstring; it matters for ``marginals=unbalanced``).
    marginals: ``balanced`` (strict marginals) or ``unbalanced`` (De Plaen et al., CVPR 2023: the column
        marginals, background included, relaxed by ``tau * KL``; rows stay strict, see
        :mod:`detr_ot.matching.unbalanced`).
    tau: the KL strength of ``marginals=unbalanced`` (POT's ``reg_m`` for the columns), in the units of the
        normalised cost like epsilon; ``inf`` gives the balanced plan.
    mode: ``soft`` returns the entropic plan; ``hard`` the assignment it rounds to (k_j queries per ground
        truth).
    gradient: ``unrolled`` (autograd through the iterations; soft mode), ``detached`` (no gradient),
        ``straight_through`` (hard mode: the hard plan forward, the unrolled soft plan's gradient backward), or
        ``implicit`` (the gradient of the converged plan by implicit differentiation, memory independent of
        ``iters``, :mod:`detr_ot.matching.implicit`; balanced or unbalanced; in hard mode passed straight
        through).
    backend: ``torch`` (batched) or ``pot`` (a loop over images calling POT's ``ot.sinkhorn(...,
        method="sinkhorn_log")`` or ``ot.unbalanced.sinkhorn_unbalanced``, for verification).
    """

    _name: ClassVar[str] = "sinkhorn"
    epsilon: float = 0.05
    epsilon_start: float = 0.0
    anneal: str = "geometric"
    iters: int = 50
    tol: float = 0.0
    check_every: int = 10
    normalize: str = "max"
    background_cost: float = 0.0
    marginals: str = "balanced"
    tau: float = 1.0
    mode: str = "soft"
    gradient: str = "unrolled"
    backend: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()

        def check(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ValueError(f"matcher.sinkhorn.{name}={value!r}: use one of {list(allowed)}")

        check("normalize", self.normalize, _NORMALIZE)
        check("mode", self.mode, _MODES)
        check("gradient", self.gradient, _GRADIENTS)
        check("backend", self.backend, _BACKENDS)
        check("anneal", self.anneal, _ANNEAL)
        check("marginals", self.marginals, _MARGINALS)
        if not self.epsilon > 0 or self.epsilon_start < 0 or not self.tau > 0:
            raise ValueError(
                f"matcher.sinkhorn.epsilon={self.epsilon} and tau={self.tau} must be > 0, "
                f"epsilon_start={self.epsilon_start} >= 0"
            )
        if self.iters < 1 or self.check_every < 1 or self.tol < 0:
            raise ValueError(
                f"matcher.sinkhorn: iters={self.iters} and check_every={self.check_every} must be >= 1, "
                f"tol={self.tol} >= 0"
            )
        if self.mode == "hard" and self.gradient == "unrolled":
            raise ValueError(
                "matcher.sinkhorn.mode=hard with gradient=unrolled: a rounded plan has zero derivative; use "
                "gradient=straight_through (hard forward, soft backward), implicit or detached"
            )
        if self.mode == "soft" and self.gradient == "straight_through":
            raise ValueError(
                "matcher.sinkhorn.gradient=straight_through needs mode=hard (it passes the soft plan's "
                "gradient straight through the rounding)"
            )
        if self.gradient == "implicit" and self.backend != "torch":
            raise ValueError(
                "matcher.sinkhorn.gradient=implicit differentiates the fixed point with the torch backend; use "
                "backend=torch, or gradient=unrolled to differentiate through POT"
            )


def _sinkhorn_pot(
    cost: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    col_mask: torch.Tensor,
    options: SinkhornOptions,
    epsilon: float,
) -> torch.Tensor:
    """Per-image POT reference (``backend=pot``) on each image's real columns: ``ot.sinkhorn(a, b, M, reg,
    method='sinkhorn_log')``, or for ``marginals=unbalanced`` ``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg,
    reg_m=(inf, tau))`` followed by the final row update of :func:`sinkhorn_unbalanced_log` (``exact_rows``).
    POT's torch backend keeps autograd, so ``gradient=unrolled`` still works."""
    import ot  # POT, a project dependency; imported lazily as it is only the verification backend

    plan = torch.zeros_like(cost)
    keep = col_mask & (cols > 0)
    for b in range(cost.shape[0]):  # the reference loops over images on purpose
        idx = keep[b].nonzero().squeeze(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if options.marginals == "unbalanced":
                block = ot.unbalanced.sinkhorn_unbalanced(
                    rows[b],
                    cols[b, idx],
                    cost[b][:, idx],
                    epsilon,
                    (math.inf, options.tau),
                    method="sinkhorn",
                    numItermax=options.iters,
                    stopThr=0.0,
                )
                block = block * (rows[b] / block.sum(1))[:, None]
            else:
                block = ot.sinkhorn(
                    rows[b],
                    cols[b, idx],
                    cost[b][:, idx],
                    epsilon,
                    method="sinkhorn_log",
                    numItermax=options.iters,
                    stopThr=options.tol,
                    warn=False,
                )
        plan[b, :, idx] = block  # autograd records the copy, so gradient=unrolled flows through POT
    return plan


def _cost_scale(cost: torch.Tensor, gt_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Per-image normaliser (B,) of the detached cost over its real entries (1 when ``how == 'none'`` or the
    image has no ground truth)."""
    if how == "none":
        return torch.ones(cost.shape[0], dtype=cost.dtype, device=cost.device)
    c = torch.where(gt_mask[:, None, :], cost.detach().abs(), 0).flatten(1)  # B x (Q * M), real entries kept
    if how == "max":
        scale = c.amax(1)
    else:
        scale = c.sum(1) / (gt_mask.sum(1) * cost.shape[1]).clamp_min(1)
    scale = torch.where(gt_mask.any(1), scale, torch.ones_like(scale))
    return scale.clamp_min(torch.finfo(c.dtype).tiny ** 0.5)


@MATCHERS.register("sinkhorn", options=SinkhornOptions)
class SinkhornMatcher(Matcher):
    """Entropic OT matching (Cuturi, NeurIPS 2013) with a background supplier column and per-ground-truth
    supplies, batched over the images of a batch; see the module docstring for the problem."""

    options: SinkhornOptions

    def __init__(self, weights: CostWeights, options: SinkhornOptions | None = None) -> None:
        super().__init__(weights, options or SinkhornOptions())
        self.epsilon = self._epsilon_at(0, 1)

    def _epsilon_at(self, epoch: int, num_epochs: int) -> float:
        o = self.options
        if o.epsilon_start <= 0:
            return o.epsilon
        t = 1.0 if num_epochs <= 1 else min(max(epoch / (num_epochs - 1), 0.0), 1.0)
        if o.anneal == "geometric":
            return math.exp((1 - t) * math.log(o.epsilon_start) + t * math.log(o.epsilon))
        return (1 - t) * o.epsilon_start + t * o.epsilon

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Anneals epsilon: ``epsilon_start`` at epoch 0, ``epsilon`` at the last epoch."""
        super().set_epoch(epoch, num_epochs)
        self.epsilon = self._epsilon_at(epoch, num_epochs)

    def extra_repr(self) -> str:
        o = self.options
        tau = f", tau={o.tau:g}" if o.marginals == "unbalanced" else ""
        return (
            f"epsilon={self.epsilon:g}, iters={o.iters}, supply={o.supply}, marginals={o.marginals}{tau}, "
            f"mode={o.mode}, gradient={o.gradient}, backend={o.backend}"
        )

    def _soft_plan(
        self, full: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, col_mask: torch.Tensor
    ) -> torch.Tensor:
        o, eps = self.options, self.epsilon
        if o.backend == "pot":
            return _sinkhorn_pot(full, rows, cols, col_mask, o, eps)
        tau = o.tau if o.marginals == "unbalanced" else math.inf
        if o.gradient == "implicit":
            return sinkhorn_implicit(full, rows, cols, col_mask, eps, o.iters, o.tol, o.check_every, tau)
        if o.marginals == "unbalanced":
            return sinkhorn_unbalanced_log(
                full, rows, cols, col_mask, eps, o.tau, math.inf, o.iters, o.tol, o.check_every, exact_rows=True
            )
        return sinkhorn_log(full, rows, cols, col_mask, eps, o.iters, o.tol, o.check_every)

    def forward(self, terms: PairwiseTerms) -> Assignment:
        o = self.options
        batch, queries, m = terms.shape
        gt_mask = terms.gt_mask
        if m == 0:
            return Assignment(plan=self.empty_like(terms), gt_mask=gt_mask, hard=o.mode == "hard")
        k = supplies(terms, o)  # raises naming the image when M > Q
        cost = matching_cost(terms, self.weights, detach=o.gradient == "detached")
        if o.mode == "hard" and o.gradient == "detached":  # the rounding is C's exact assignment (docstring)
            return Assignment(plan=solve_one_to_many(cost.detach(), k, gt_mask), gt_mask=gt_mask, hard=True)

        cost = cost / _cost_scale(cost, gt_mask, o.normalize)[:, None, None]
        full = torch.cat([torch.full_like(cost[..., :1], o.background_cost), cost], dim=-1)
        col_mask = torch.cat([torch.ones_like(gt_mask[:, :1]), gt_mask], dim=1)
        rows = torch.ones(batch, queries, dtype=cost.dtype, device=cost.device)
        soft = self._soft_plan(full, rows, column_marginals(k, queries, cost.dtype), col_mask)
        if o.mode == "soft":
            return Assignment(plan=soft, gt_mask=gt_mask, hard=False)
        hard = solve_one_to_many(cost.detach(), k, gt_mask)
        return Assignment(plan=hard + (soft - soft.detach()), gt_mask=gt_mask, hard=True)
