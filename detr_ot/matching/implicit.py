r"""Implicit differentiation of the balanced entropic OT plan: the gradient of the fixed point, not of the
iterations (Luise, Rudi, Pontil, Ciliberto, "Differential Properties of Sinkhorn Approximation for Learning with
Wasserstein Distance", NeurIPS 2018; Eisenberger, Toker, Leal-Taixe, Bernard, Cremers, "A Unified Framework for
Implicit Sinkhorn Differentiation", CVPR 2022).

Forward: Sinkhorn's iterations without a graph (:func:`~detr_ot.matching.balanced.sinkhorn_log`), so memory does
not grow with the iteration count. Backward: the plan ``P_ij = exp(-C_ij / eps + u_i + v_j)`` satisfies
``P 1 = a`` and ``P^T 1 = b``; differentiating both at fixed marginals gives

    dP_ij = P_ij (-dC_ij / eps + du_i + dv_j),
    H [du; dv] = (1/eps) [(P o dC) 1; (P o dC)^T 1],      H = [[diag(a), P], [P^T, diag(b)]].

For ``g = dL/dP``, with ``alpha = (g o P) 1`` and ``beta = (g o P)^T 1``, the adjoint ``[x; y] = H^-1 [alpha;
beta]`` gives

    dL/dC_ij = P_ij (x_i + y_j - g_ij) / eps.

H is singular along ``[1; -1]`` (shifting u up and v down leaves P unchanged), and ``[alpha; beta]`` is
orthogonal to it (both sum to ``<g, P>``), so any solution serves: ``x_i + y_j`` is the same for all. It is
solved through the Schur complement on the column side, ``x = (alpha - P y) / a`` and

    (diag(b) - P^T diag(1/a) P) y = beta - P^T (alpha / a),

an N x N system per image (N = M + 1 columns, background included; batched ``torch.linalg.solve``) whose one
null direction (the all-ones vector over the real columns) is filled by a rank-one term ``c w w^T / |w|^2``,
which does not change ``x_i + y_j``. ``a`` and ``b`` are read off the plan itself (its row and column sums), so
the gradient is the exact derivative of the entropic plan for the marginals the returned plan has (a exactly;
b to the iterations' tolerance). The supplies of one-to-many matching (non-uniform b) need nothing more. The
marginals are treated as constants (the supplies come from the detached IoU).

Unbalanced OT with strict rows and KL-relaxed columns (:mod:`detr_ot.matching.unbalanced`): at the fixed point
``v_j = (tau / eps) log(b_j / (P^T 1)_j)``; differentiating it replaces the column block ``diag(b)`` of H by
``(1 + eps / tau) diag(P^T 1)``, everything else unchanged. H is then non-singular (no rank-one fill).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from detr_ot.matching.balanced import sinkhorn_log
from detr_ot.matching.unbalanced import sinkhorn_unbalanced_log


class ImplicitSinkhorn(torch.autograd.Function):
    """Entropic plan forward (no graph), implicit-function-theorem backward (module docstring). ``tau``: inf for
    the balanced problem, finite for the unbalanced one with strict rows (:mod:`detr_ot.matching.unbalanced`,
    ``exact_rows``)."""

    @staticmethod
    def forward(
        ctx: Any,
        cost: torch.Tensor,
        row_marginals: torch.Tensor,
        col_marginals: torch.Tensor,
        col_mask: torch.Tensor,
        epsilon: float,
        iters: int,
        tol: float,
        check_every: int,
        tau: float,
    ) -> torch.Tensor:
        with torch.no_grad():
            if math.isinf(tau):
                plan = sinkhorn_log(cost, row_marginals, col_marginals, col_mask, epsilon, iters, tol, check_every)
            else:
                plan = sinkhorn_unbalanced_log(
                    cost, row_marginals, col_marginals, col_mask, epsilon, tau, math.inf, iters, tol, check_every,
                    exact_rows=True,
                )
        ctx.save_for_backward(plan)
        ctx.epsilon, ctx.tau = epsilon, tau
        return plan

    @staticmethod
    def backward(ctx: Any, grad_plan: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (plan,) = ctx.saved_tensors
        grad = implicit_plan_vjp(plan, grad_plan, ctx.epsilon, ctx.tau)
        return grad, None, None, None, None, None, None, None, None


def implicit_plan_vjp(
    plan: torch.Tensor, grad_plan: torch.Tensor, epsilon: float, tau: float = math.inf
) -> torch.Tensor:
    """``dL/dC`` (B x Q x N) from the converged plan ``P`` and ``g = dL/dP`` (module docstring; ``tau`` finite:
    the unbalanced column block ``(1 + eps / tau) diag(b)``, no null direction). The B x Q x N products run in
    the plan's dtype; the N x N systems are solved in float64, where the Schur complement's cancellation (its
    rows sum to zero in the balanced case) costs the least."""
    p = plan.detach()
    g = grad_plan.to(p.dtype)
    gp = g * p
    alpha, beta = gp.sum(2), gp.sum(1)  # B x Q, B x N
    a = p.sum(2).clamp_min(torch.finfo(p.dtype).tiny)
    b = p.sum(1)
    real = b > 0  # columns that carry mass (padded and zero-supply columns do not)
    pa = p / a[:, :, None]
    relax = 1.0 if math.isinf(tau) else 1.0 + epsilon / tau
    schur = (torch.diag_embed(b * relax) - torch.bmm(p.transpose(1, 2), pa)).double()  # B x N x N
    rhs = (beta - torch.bmm(alpha[:, None, :], pa).squeeze(1)).double()
    w = real.double()
    if math.isinf(tau):  # fill the balanced problem's null direction (all ones over the real columns)
        count = w.sum(1).clamp_min(1)
        scale = (b.double().sum(1) / count).clamp_min(torch.finfo(torch.float64).tiny)  # a typical eigenvalue
        schur = schur + (scale / count)[:, None, None] * w[:, :, None] * w[:, None, :]
    schur = schur + torch.diag_embed(1 - w)  # y_j = 0 on columns without mass
    y = torch.linalg.solve_ex(schur, rhs * w)[0].to(p.dtype)  # non-singular by construction: no error check
    x = (alpha - torch.bmm(y[:, None, :], p.transpose(1, 2)).squeeze(1)) / a
    return (x[:, :, None] + y[:, None, :]).sub_(g).mul_(p).div_(epsilon).to(grad_plan.dtype)


def sinkhorn_implicit(
    cost: torch.Tensor,
    row_marginals: torch.Tensor,
    col_marginals: torch.Tensor,
    col_mask: torch.Tensor | None = None,
    epsilon: float = 0.05,
    iters: int = 50,
    tol: float = 0.0,
    check_every: int = 10,
    tau: float = math.inf,
) -> torch.Tensor:
    """The plan of :func:`~detr_ot.matching.balanced.sinkhorn_log` (``tau = inf``) or of
    :func:`~detr_ot.matching.unbalanced.sinkhorn_unbalanced_log` with strict rows and ``exact_rows`` (finite
    ``tau``), same arguments, with the implicit gradient into ``cost``."""
    if col_mask is None:
        col_mask = torch.ones(cost.shape[0], cost.shape[2], dtype=torch.bool, device=cost.device)
    return ImplicitSinkhorn.apply(
        cost, row_marginals, col_marginals, col_mask, epsilon, iters, tol, check_every, tau
    )
