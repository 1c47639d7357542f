"""Entropic optimal-transport matcher: Sinkhorn-Knopp in the log domain, batched over the images of a batch.

Problem (000_8c158015f19ac4ee.txt eqs. 2.60-2.61 with the entropic term of eq. 2.67; iterations of
Algorithm 1 / eq. 2.69 written in the log domain): for one image with Q queries and M ground truths,

    min_{S >= 0}  <S, C> - eps * H(S)   s.t.  sum_j S_ij = a_i = 1  (every query, columns 0..M),
                                              sum_i S_ij = b_j = 1  (every ground truth j = 1..M),
                                              sum_i S_i0 = b_0 = Q - M  (the background "supplier"),

with C_i0 the background cost. Column 0 absorbs the Q - M queries that match nothing, so the problem is
balanced (sum a = sum b = Q) and the plan's rows sum to 1, as :class:`Assignment` requires.

Facts used below (all proven by the row/column-shift invariance of the transport polytope: adding r_i to row i
or s_j to column j of C changes <S, C> by the constant sum_i r_i a_i + sum_j s_j b_j):
  * a background cost that is the same for every query is absorbed by the column potential g_0, so it changes
    neither the entropic plan nor the exact one; only a per-query background cost would matter;
  * every Sinkhorn iterate is S = diag(e^u) K diag(e^v) (eq. 2.58), so -log S_ij = C_ij/eps - u_i - v_j and
    the most probable one-to-one assignment under S (max prod S over assignments) is exactly the min-cost
    (Hungarian) assignment of C, at any eps and any iteration count: ``mode="hard"`` therefore rounds with
    :func:`solve_hungarian` on the cost itself (tested against a brute-force rounding of the plan);
  * as eps -> 0 the entropic plan tends to the (max-entropy) optimal plan (eq. 2.68), which is the Hungarian
    assignment when that is unique (tested).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from detr_ot.matching.assignment import Assignment
from detr_ot.matching.base import MATCHERS, Matcher
from detr_ot.matching.hungarian import solve_hungarian
from detr_ot.matching.pairwise import CostWeights, PairwiseTerms, matching_cost

_NORMALIZE = ("none", "max", "mean")
_MODES = ("soft", "hard")
_GRADIENTS = ("unrolled", "detached", "straight_through")
_BACKENDS = ("torch", "pot")
_ANNEAL = ("geometric", "linear")
_PROMOTE_RANGE = 2.0**14  # max|C|/eps above which float32 costs are iterated in float64 (see sinkhorn_log)


@dataclass
class SinkhornOptions:
    """Config keys ``matcher.sinkhorn.<field>``.

    epsilon: entropic regularisation (on the normalised cost when ``normalize`` is not ``none``); with
        ``epsilon_start > 0`` it is the value reached at the last epoch.
    epsilon_start: > 0 anneals epsilon from this value (first epoch) to ``epsilon`` (last epoch);
        0 keeps epsilon constant.
    anneal: ``geometric`` (log-linear in the epoch) or ``linear`` schedule.
    iters: maximum number of Sinkhorn iterations (one column + one row update each).
    tol: > 0 stops once the largest column-marginal violation of the batch is below ``tol`` (checked every
        ``check_every`` iterations, like POT); 0 runs exactly ``iters`` iterations.
    normalize: divide each image's cost by its max (``max``) or mean (``mean``) absolute real entry, computed
        on the detached cost so the scale is not differentiated; ``none`` keeps the raw cost.
    background_cost: C_i0, the same for every query (a constant is absorbed by the background potential, see
        the module docstring, so it does not change the plan; kept for completeness).
    mode: ``soft`` returns the entropic plan; ``hard`` the one-to-one assignment it rounds to.
    gradient: ``unrolled`` (autograd through the iterations; soft mode), ``detached`` (no gradient), or
        ``straight_through`` (hard mode: the hard plan forward, the unrolled soft plan's gradient backward).
    backend: ``torch`` (batched, this module) or ``pot`` (a loop over images calling
        ``ot.sinkhorn(..., method="sinkhorn_log")``, for verification).
    """

    epsilon: float = 0.05
    epsilon_start: float = 0.0
    anneal: str = "geometric"
    iters: int = 50
    tol: float = 0.0
    check_every: int = 10
    normalize: str = "max"
    background_cost: float = 0.0
    mode: str = "soft"
    gradient: str = "unrolled"
    backend: str = "torch"

    def __post_init__(self) -> None:
        def check(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ValueError(f"matcher.sinkhorn.{name}={value!r}: use one of {list(allowed)}")

        check("normalize", self.normalize, _NORMALIZE)
        check("mode", self.mode, _MODES)
        check("gradient", self.gradient, _GRADIENTS)
        check("backend", self.backend, _BACKENDS)
        check("anneal", self.anneal, _ANNEAL)
        if not self.epsilon > 0 or self.epsilon_start < 0:
            raise ValueError(
                f"matcher.sinkhorn.epsilon={self.epsilon} must be > 0 and "
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
                "gradient=straight_through (hard forward, soft backward) or gradient=detached"
            )
        if self.mode == "soft" and self.gradient == "straight_through":
            raise ValueError(
                "matcher.sinkhorn.gradient=straight_through needs mode=hard (it passes the soft plan's "
                "gradient straight through the rounding)"
            )


def _masked_fill_value(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf in the log-kernel of masked columns: it never wins a max, its exp() term is
    clamped away, and no inf - inf = NaN can appear in the forward or backward pass."""
    return -torch.finfo(dtype).max / 4


def sinkhorn_log(
    cost: torch.Tensor,
    row_marginals: torch.Tensor,
    col_marginals: torch.Tensor,
    col_mask: torch.Tensor | None = None,
    epsilon: float = 0.05,
    iters: int = 50,
    tol: float = 0.0,
    check_every: int = 10,
) -> torch.Tensor:
    """Batched entropic OT plan in the log domain.

    ``cost`` B x Q x N, ``row_marginals`` B x Q (> 0), ``col_marginals`` B x N, ``col_mask`` B x N (True for
    real columns; masked columns, and columns of zero marginal, carry no mass). Returns the plan B x Q x N.

    Algorithm 1 of 000_8c158015f19ac4ee.txt (eq. 2.69) with scaled log-potentials u = log(u_scaling),
    v = log(v_scaling): ``v = log b - LSE_i(-C/eps + u)``, then ``u = log a - LSE_j(-C/eps + v)``, the same
    order as POT's ``sinkhorn_log`` (so a fixed iteration count gives POT's plan, not only the converged one),
    ending with the row update so every row of the returned plan sums to its ``a_i`` exactly. ``tol > 0``:
    stop once the largest absolute column-marginal violation in the batch is below ``tol``, checked every
    ``check_every`` iterations. Differentiable by autograd (unrolled); no loop over images.

    Precision: the log-plan ``-C/eps + u + v`` cancels terms of size max|C|/eps, so in float32 the plan's
    relative error is about 6e-8 * max|C|/eps (6% at costs 1e3 and eps 1e-3). When max|C|/eps exceeds
    ``2**14`` a lower-precision cost is therefore iterated in float64 and the plan cast back (one host sync);
    half-precision costs are always iterated in float32 at least.
    """
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn_log: cost must be B x Q x N, got shape {tuple(cost.shape)}")
    if col_mask is None:
        col_mask = torch.ones(cost.shape[0], cost.shape[2], dtype=torch.bool, device=cost.device)
    col_mask = col_mask & (col_marginals > 0)
    out_dtype = cost.dtype
    if out_dtype in (torch.float16, torch.bfloat16):  # 8-11 bit mantissas cannot hold log-potentials
        cost = cost.float()
    if cost.dtype != torch.float64 and cost.numel() > 0:
        dynamic_range = torch.where(col_mask[:, None, :], cost.detach().abs(), 0).amax() / epsilon
        if float(dynamic_range) > _PROMOTE_RANGE:
            cost = cost.double()
    neg = _masked_fill_value(cost.dtype)
    floor = _exp_floor(cost.dtype)
    log_k = torch.where(col_mask[:, None, :], -cost / epsilon, torch.full_like(cost, neg))
    log_k_t = log_k.transpose(1, 2).contiguous()  # the column update reduces over a contiguous last dim
    log_a = row_marginals.to(cost.dtype).log()
    b = col_marginals.to(cost.dtype)
    log_b = torch.where(col_mask, b.clamp_min(torch.finfo(cost.dtype).tiny).log(), torch.zeros_like(b))
    zero_b = torch.zeros_like(b)
    u = torch.zeros_like(log_a)
    v = zero_b
    for it in range(iters):
        v = torch.where(col_mask, log_b - _logsumexp_last(log_k_t + u[:, None, :], floor), zero_b)
        u = log_a - _logsumexp_last(log_k + v[:, None, :], floor)
        if tol > 0 and it % check_every == 0:
            with torch.no_grad():
                cols = _plan(log_k, u, v, col_mask, floor).sum(1)
                err = torch.where(col_mask, cols - b, zero_b).abs().amax()
            if float(err) < tol:
                break
    return _plan(log_k, u, v, col_mask, floor).to(out_dtype)


def _exp_floor(dtype: torch.dtype) -> float:
    """Exponents below this are clamped before exp(): their terms are < 1e-36 of the largest (zero for the
    result), and exp() of arguments that underflow to subnormals is ~40x slower on x86 CPUs."""
    return math.log(torch.finfo(dtype).tiny) + 4.0


def _logsumexp_last(x: torch.Tensor, floor: float) -> torch.Tensor:
    """log-sum-exp over the last dimension, shifted by the (detached, hence constant) max and clamped at
    ``floor``; about 2x faster than ``torch.logsumexp`` here, same value to rounding."""
    m = x.detach().amax(-1, keepdim=True)
    return x.sub(m).clamp_min_(floor).exp_().sum(-1).log_() + m.squeeze(-1)


def _plan(log_k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, col_mask: torch.Tensor, floor: float):
    """exp(-C/eps + u_i + v_j); masked columns exactly 0."""
    log_plan = (log_k + u[:, :, None] + v[:, None, :]).clamp_min(floor)
    return torch.where(
        col_mask[:, None, :], log_plan.exp(), torch.zeros((), dtype=log_k.dtype, device=log_k.device)
    )


def _sinkhorn_pot(
    cost: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    col_mask: torch.Tensor,
    options: SinkhornOptions,
    epsilon: float,
) -> torch.Tensor:
    """Per-image POT reference (``backend=pot``): ``ot.sinkhorn(a, b, M, reg, method='sinkhorn_log')`` on each
    image's real columns; POT's torch backend keeps autograd, so ``gradient=unrolled`` still works."""
    import ot  # POT, a project dependency; imported lazily as it is only the verification backend

    plan = torch.zeros_like(cost)
    keep = col_mask & (cols > 0)
    for b in range(cost.shape[0]):  # the reference loops over images on purpose
        idx = keep[b].nonzero().squeeze(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
    c = cost.detach().abs()
    keep = gt_mask[:, None, :].expand_as(c)
    if how == "none":
        return torch.ones(c.shape[0], dtype=c.dtype, device=c.device)
    if how == "max":
        scale = torch.where(keep, c, torch.zeros_like(c)).amax(dim=(1, 2))
    else:
        scale = torch.where(keep, c, torch.zeros_like(c)).sum(dim=(1, 2)) / keep.sum(dim=(1, 2)).clamp_min(1)
    scale = torch.where(gt_mask.any(1), scale, torch.ones_like(scale))
    return scale.clamp_min(torch.finfo(c.dtype).tiny ** 0.5)


@MATCHERS.register("sinkhorn", options=SinkhornOptions)
class SinkhornMatcher(Matcher):
    """Entropic OT matching (Cuturi 2013; 000_8c158015f19ac4ee.txt sec. 2.4, Algorithm 1) with a background
    supplier column, batched over the images of a batch; see the module docstring for the problem."""

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
        return (
            f"epsilon={self.epsilon:g}, iters={o.iters}, mode={o.mode}, gradient={o.gradient}, "
            f"backend={o.backend}"
        )

    def forward(self, terms: PairwiseTerms) -> Assignment:
        o = self.options
        batch, queries, m = terms.shape
        gt_mask = terms.gt_mask
        if m == 0:
            return Assignment(plan=self.empty_like(terms), gt_mask=gt_mask, hard=o.mode == "hard")
        counts = gt_mask.sum(1)
        too_many = counts > queries
        if bool(too_many.any()):
            b = int(too_many.nonzero()[0])
            raise ValueError(
                f"sinkhorn matcher: image id {terms.image_ids[b]} (batch index {b}) has {int(counts[b])} "
                f"ground truths but only {queries} queries; the one-to-one problem needs M <= Q"
            )
        cost = matching_cost(terms, self.weights, detach=o.gradient == "detached")
        if o.mode == "hard" and o.gradient == "detached":  # the rounding is C's Hungarian plan (docstring)
            return Assignment(plan=solve_hungarian(cost.detach(), gt_mask), gt_mask=gt_mask, hard=True)

        cost = cost / _cost_scale(cost, gt_mask, o.normalize)[:, None, None]
        full = torch.cat([torch.full_like(cost[..., :1], o.background_cost), cost], dim=-1)
        col_mask = torch.cat([torch.ones_like(gt_mask[:, :1]), gt_mask], dim=1)
        rows = torch.ones(batch, queries, dtype=cost.dtype, device=cost.device)
        cols = torch.cat([(queries - counts)[:, None].to(cost.dtype), gt_mask.to(cost.dtype)], dim=1)
        if o.backend == "pot":
            soft = _sinkhorn_pot(full, rows, cols, col_mask, o, self.epsilon)
        else:
            soft = sinkhorn_log(full, rows, cols, col_mask, self.epsilon, o.iters, o.tol, o.check_every)
        if o.mode == "soft":
            return Assignment(plan=soft, gt_mask=gt_mask, hard=False)
        hard = solve_hungarian(cost.detach(), gt_mask)
        return Assignment(plan=hard + (soft - soft.detach()), gt_mask=gt_mask, hard=True)
