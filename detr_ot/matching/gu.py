r"""Hungarian forward, Generalized-Update backward (M.S. thesis "Incorporating Piecewise Linear Functions with
Constant Regions in Backpropagation", METU, 2025, ch. 3, eqs. 3.5-3.6).

Forward: ``S = P(C)``, the exact min-cost one-to-one assignment. Backward: the solver's Jacobian is zero
almost everywhere, so eq. 3.5 replaces ``dL/dC`` by the Generalized Update

    dL/dC = alpha * (P(C) - P(C)*),   alpha = -1,

alpha = -1 because the solver is monotone *decreasing* in the cost (eq. 3.6: raising C_ij can only take mass
off the pair (i, j)). ``P(C)*`` is a target solution built from ``g = dL/dS``:

* ``identity`` (Sahoo, Paulus, Vlastelica, Musil, Kuleshov, Martius, "Backpropagation through combinatorial
  algorithms: Identity with projection works", ICLR 2023, eq. 3, sec. 3.2): ``P* = P - g``  =>
  ``dL/dC = -g``, optionally through the derivative of an invariant projection (sec. 3.4, eqs. 10-14:
  per-ground-truth-column mean subtraction since every ground truth is matched exactly once, ``P_mean``;
  ``P_norm``; ``P_std`` = ``P_norm o P_mean``) and with the noise-induced margin (sec. 3.6: ``C + xi``,
  ``xi`` uniform on ``{-margin/2, +margin/2}``, in the training forward).
* ``blackbox`` (Vlastelica, Paulus, Musil, Martius, Rolinek, "Differentiation of Blackbox Combinatorial
  Solvers", ICLR 2020; Sahoo et al. 2023, eq. 4): ``P* = P(C + lambda g)``  =>
  ``dL/dC = -(P(C) - P(C + lambda g)) / lambda``: eq. 3.5 with the step 1/lambda; one extra batched solve.
* ``perturbed`` (Berthet, Blondel, Teboul, Cuturi, Vert, Bach, "Learning with Differentiable Perturbed
  Optimizers", NeurIPS 2020, sec. 3, Prop. 3.1 with Gaussian noise, nabla nu(z) = z): the
  smoothed solver ``P_sigma(C) = E[P(C + sigma Z)]`` has Jacobian ``J = E[P(C + sigma Z) Z^T] / sigma``, so
  ``dL/dC = J^T g = 1/(sigma K) sum_k (<P(C + sigma Z_k), g> - <P(C), g>) Z_k`` (K samples; subtracting
  ``<P(C), g>`` is a control variate, unbiased because E[Z] = 0). Forward ``hard`` (P(C)) or ``mean``
  (the Monte-Carlo P_sigma(C), Def. 3.1).

Why all three are ``alpha (P - P*)`` with alpha = -1, i.e. ``dL/dC = P* - P`` with ``P* = P - H g`` for a
positive semi-definite "sensitivity" H of the solver: identity takes H = I. Blackbox takes the secant of
the solver along g: ``H g = -(P(C + lambda g) - P(C)) / lambda``, which is >= 0 along g because a minimiser
is monotone decreasing (<P(C + lambda g) - P(C), g> <= 0 by optimality of both solutions). Perturbed takes
H = -J, and J = d^2 F_sigma / dC^2 of the concave smoothed minimum F_sigma(C) = E[min_S <S, C + sigma Z>] is
symmetric negative semi-definite (Berthet et al. 2020, Prop. 2.2), so H is PSD. The three differ only in how
far and through which geometry the target ``P*`` moves from P against the loss gradient.

The background column. The assignment is the (M+1)-column problem whose column 0 has capacity Q - M and cost
C_i0 (a constant, 0). Every query row of S sums to 1, so ``S_i0 = 1 - sum_j S_ij`` and the loss only sees the
gt part S' through ``dL/dS'_ij = g_ij - g_i0`` (moving query i from background to gt j changes L by
g_ij - g_i0). Equivalently, adding r_i to a whole row of the full cost does not change the solution, so
any update of the full cost can be shifted per row to leave the (fixed) background column untouched: the
full update ``-g`` becomes ``-(g_ij - g_i0)`` on the gt columns. All rules therefore use
``g' = g[..., 1:] - g[..., :1]``: identity returns ``-g'``; blackbox solves ``C + lambda g'`` (= the full
problem on ``C_full + lambda g``, by the same row shift); perturbed uses ``<P_k - P, g> = <P'_k - P', g'>``
(exact). The M-column Hungarian solve equals the (M+1)-column problem because with a constant C_i0 the
background part of the objective is (Q - M) * C_i0 for every assignment (tested against a brute-force
(M+1)-column solver, with a non-constant background perturbation reduced the same way).

When blackbox is silent. If the matching cost is the set loss's own pairwise cost (focal class cost and cost
weights equal to the loss weights, as in configs/shapes.yaml), then ``g' = C / N + const`` (N boxes; the
GIoU loss is 1 - GIoU), so ``C + lambda g'`` orders every assignment as C does, ``P(C + lambda g') = P(C)``,
and the update is exactly zero: GU-blackbox trains bit for bit like Hungarian (tests/test_gu.py; the shapes
ablation). It acts once cost and loss differ (e.g. ``matcher.cost_class`` != ``loss.cls_weight``).
Identity with ``projection=mean_norm`` is silent in the same setting (to rounding): g' lies along the
centred cost, a direction that only rescales the problem, which P_norm' removes. Identity with ``mean`` or
``none`` is not: its update ``-g'`` moves every pair's cost by that pair's own loss value, i.e. it ascends
the spread of the costs and pushes every unmatched query away from every ground truth, which collapsed
training on the shapes ablation (README, "GU targets").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from detr_ot.matching.assignment import Assignment
from detr_ot.matching.base import MATCHERS, Matcher
from detr_ot.matching.hungarian import solve_hungarian
from detr_ot.matching.pairwise import CostWeights, PairwiseTerms, matching_cost

_TARGETS = ("identity", "blackbox", "perturbed")
_PROJECTIONS = ("none", "mean", "norm", "mean_norm")
_FORWARDS = ("hard", "mean")
_DEFAULT_SCALE = {"blackbox": 1.0, "identity": 0.05, "perturbed": 0.05}


@dataclass
class GUOptions:
    """Config keys ``matcher.gu.<field>``.

    target: ``identity`` | ``blackbox`` | ``perturbed`` (the rule for ``P(C)*``, module docstring).
    scale: weight of the returned ``dL/dC``; by default 1 for blackbox, 0.05 for identity and perturbed
        (``_DEFAULT_SCALE``, the settings that trained on the shapes ablation; README, "GU targets").
        per_query: also divide by the number of queries Q.
    projection: identity only: ``none`` | ``mean`` (per-ground-truth-column mean over queries removed) |
        ``norm`` | ``mean_norm`` (Sahoo et al. 2023, sec. 3.4). Default ``mean_norm``, the one that trained on
        the shapes ablation (see the module docstring and the README).
    margin: noise-induced margin (Sahoo et al. 2023, sec. 3.6): in training, the solver sees ``C + xi`` with
        xi uniform on ``{-margin/2, +margin/2}`` per entry; 0 disables. Applies to every target (the backward is
        computed at the noisy cost the forward used).
    lam: blackbox interpolation strength lambda (``lambda`` is a Python keyword).
    sigma, samples, forward: perturbed noise scale, number K of samples, and forward value (``hard``: P(C);
        ``mean``: the average of the K perturbed solutions).
    """

    target: str = "blackbox"
    scale: float | None = None  # None: _DEFAULT_SCALE[target]
    per_query: bool = False
    projection: str = "mean_norm"
    margin: float = 0.0
    lam: float = 10.0
    sigma: float = 0.5
    samples: int = 8
    forward: str = "hard"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("target", self.target, _TARGETS),
            ("projection", self.projection, _PROJECTIONS),
            ("forward", self.forward, _FORWARDS),
        ):
            if value not in allowed:
                raise ValueError(f"matcher.gu.{name}={value!r}: use one of {list(allowed)}")
        if self.scale is None:
            self.scale = _DEFAULT_SCALE[self.target]
        if self.scale < 0:
            raise ValueError(f"matcher.gu.scale={self.scale} must be >= 0")
        if self.lam <= 0 or self.sigma <= 0 or self.samples < 1 or self.margin < 0:
            raise ValueError(
                f"matcher.gu: lam={self.lam} and sigma={self.sigma} must be > 0, "
                f"samples={self.samples} >= 1, margin={self.margin} >= 0"
            )
        if self.forward == "mean" and self.target != "perturbed":
            raise ValueError("matcher.gu.forward=mean is only defined for target=perturbed")


def reduced_gradient(g: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """``g' = dL/dS'`` on the ground-truth columns: ``g[..., 1:] - g[..., :1]``, zero on padded columns
    (module docstring: the background entry of a row is 1 - the row's gt mass)."""
    return (g[..., 1:] - g[..., :1]) * gt_mask[:, None, :].to(g.dtype)


def _column_mean_projection(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """P_mean per ground-truth column: subtract the mean over the queries (Sahoo et al. 2023, eq. 13; the assignment is
    invariant to adding a constant to a column since every ground truth is matched once)."""
    return (x - x.mean(dim=1, keepdim=True)) * mask


def _norm_projection_vjp(omega: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``P_norm'(omega) x`` per image over the real entries (Sahoo et al. 2023, eq. 14; symmetric, so also the VJP):
    ``x / |omega| - omega <omega, x> / |omega|^3``."""
    norm = (omega * omega * mask).sum(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-12)
    inner = (omega * x * mask).sum(dim=(1, 2), keepdim=True)
    return (x / norm - omega * inner / norm**3) * mask


def identity_update(
    g_red: torch.Tensor, cost: torch.Tensor, gt_mask: torch.Tensor, projection: str
) -> torch.Tensor:
    """The identity rule ``dL/dC = -P'(C)^T g'`` (Sahoo et al. 2023, eqs. 3, 10, 11) on the gt columns."""
    mask = gt_mask[:, None, :].to(g_red.dtype)
    if projection == "none":
        return -g_red * mask
    if projection == "mean":
        return -_column_mean_projection(g_red, mask)
    if projection == "norm":
        return -_norm_projection_vjp(cost, g_red, mask)
    # P_std = P_norm o P_mean, whose VJP is P_mean^T P_norm'(P_mean C)^T (both factors symmetric)
    centred = _column_mean_projection(cost, mask)
    return -_column_mean_projection(_norm_projection_vjp(centred, g_red, mask), mask)


def blackbox_update(
    plan: torch.Tensor, g_red: torch.Tensor, cost: torch.Tensor, gt_mask: torch.Tensor, lam: float
) -> torch.Tensor:
    """``dL/dC = -(P(C) - P(C + lambda g')) / lambda`` on the gt columns (Vlastelica et al. 2020)."""
    target = solve_hungarian(cost + lam * g_red, gt_mask)
    return -(plan[..., 1:] - target[..., 1:]) / lam


def perturbed_update(
    plan: torch.Tensor, samples: torch.Tensor, noise: torch.Tensor, g_red: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``dL/dC = 1/(sigma K) sum_k (<P_k, g> - <P, g>) Z_k`` (Berthet et al. 2020, Prop. 3.1, control variate <P, g>);
    ``samples`` K x B x Q x (M+1) = P(C + sigma Z_k), ``noise`` K x B x Q x M = Z_k."""
    inner = ((samples[..., 1:] - plan[None, ..., 1:]) * g_red[None]).sum(dim=(2, 3))  # K x B
    return (inner[:, :, None, None] * noise).sum(0) / (sigma * noise.shape[0])


def _solve_perturbed(
    cost: torch.Tensor, gt_mask: torch.Tensor, sigma: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K Gaussian perturbations of the cost (gt columns only), solved in one batched call."""
    b, q, m = cost.shape
    noise = torch.randn(k, b, q, m, dtype=cost.dtype, device=cost.device) * gt_mask[None, :, None, :]
    plans = solve_hungarian((cost[None] + sigma * noise).reshape(k * b, q, m), gt_mask.repeat(k, 1))
    return plans.reshape(k, b, q, m + 1), noise


class GUAssign(torch.autograd.Function):
    """``S = P(C)`` forward (B x Q x (M+1) hard plan, column 0 = background), Generalized Update backward."""

    @staticmethod
    def forward(
        ctx: Any, cost: torch.Tensor, gt_mask: torch.Tensor, options: GUOptions, training: bool
    ) -> torch.Tensor:
        c = cost.detach()
        mask = gt_mask[:, None, :].to(c.dtype)
        if training and options.margin > 0:  # Sahoo et al. 2023, sec. 3.6: symmetric noise of size margin/2
            signs = torch.randint(0, 2, c.shape, device=c.device).to(c.dtype) * 2 - 1
            c = c + signs * (options.margin / 2) * mask
        plan = solve_hungarian(c, gt_mask)
        out = plan
        saved = [c, gt_mask, plan]
        if options.target == "perturbed":
            samples, noise = _solve_perturbed(c, gt_mask, options.sigma, options.samples)
            saved += [samples, noise]
            if options.forward == "mean":
                out = samples.mean(0)
        ctx.save_for_backward(*saved)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx: Any, grad_plan: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        o: GUOptions = ctx.options
        c, gt_mask, plan, *extra = ctx.saved_tensors
        g_red = reduced_gradient(grad_plan.to(c.dtype), gt_mask)
        if o.target == "identity":
            grad = identity_update(g_red, c, gt_mask, o.projection)
        elif o.target == "blackbox":
            grad = blackbox_update(plan, g_red, c, gt_mask, o.lam)
        else:
            samples, noise = extra
            grad = perturbed_update(plan, samples, noise, g_red, o.sigma)
        grad = grad * o.scale
        if o.per_query:
            grad = grad / c.shape[1]
        return grad * gt_mask[:, None, :].to(grad.dtype), None, None, None


def gu_assign(
    cost: torch.Tensor, gt_mask: torch.Tensor, options: GUOptions, training: bool = True
) -> torch.Tensor:
    """Functional form: the hard (or perturbed-mean) plan B x Q x (M+1) of ``cost`` (B x Q x M), with the
    Generalized-Update backward into ``cost``."""
    return GUAssign.apply(cost, gt_mask, options, training)


@MATCHERS.register("gu", options=GUOptions)
class GUMatcher(Matcher):
    """Exact Hungarian assignment whose backward sends the Generalized Update into the (undetached) matching
    cost, so the assignment itself is trained (the METU M.S. thesis cited in the module docstring, eqs. 3.5-3.6)."""

    options: GUOptions

    def __init__(self, weights: CostWeights, options: GUOptions | None = None) -> None:
        super().__init__(weights, options or GUOptions())

    def extra_repr(self) -> str:
        o = self.options
        return f"target={o.target}, scale={o.scale:g}, per_query={o.per_query}"

    def forward(self, terms: PairwiseTerms) -> Assignment:
        o = self.options
        if terms.shape[2] == 0:
            return Assignment(plan=self.empty_like(terms), gt_mask=terms.gt_mask, hard=True)
        cost = matching_cost(terms, self.weights, detach=False)
        plan = gu_assign(cost, terms.gt_mask, o, self.training)
        return Assignment(plan=plan, gt_mask=terms.gt_mask, hard=o.forward == "hard")
