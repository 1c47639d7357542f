r"""Unbalanced entropic optimal transport, batched over images, in the log domain.

De Plaen, De Plaen, Suykens, Proesmans, Van Gool, Van Gool, "Unbalanced Optimal Transport: A Unified Framework
for Object Detection", CVPR 2023: the matching's marginal constraints are relaxed by KL penalties, which spans
the range between OT matching (strict marginals) and matching every query to its closest ground truth (free
ground-truth marginals). For one image (the problem of POT's ``ot.unbalanced.sinkhorn_unbalanced`` with its
default ``reg_type="kl"``; Chizat, Peyre, Schmitzer, Vialard, "Scaling algorithms for unbalanced optimal
transport problems", Math. Comp. 2018; Peyre & Cuturi, "Computational Optimal Transport", 2019, sec. 10.2):

    min_{S >= 0} <S, C> + eps KL(S | a b^T) + tau_rows KL(S 1 | a) + tau KL(S^T 1 | b),

solved by the generalised Sinkhorn iterations ``u = fr (log a - LSE_j(log K_ij + v_j))`` then
``v = fc (log b - LSE_i(log K_ij + u_i))`` with ``log K_ij = -C_ij / eps + log a_i + log b_j``,
``fr = tau_rows / (tau_rows + eps)`` and ``fc = tau / (tau + eps)`` (1 for an infinite strength, i.e. a strict
marginal). This is POT's update order (``sinkhorn_knopp_unbalanced``: rows, then columns, from u = v = 0), so a
fixed iteration count gives POT's plan.

The matcher keeps the rows strict (``tau_rows = inf``: every query is an object or background, so the plan's
rows sum to 1 as :class:`~detr_ot.matching.Assignment` requires) and relaxes the columns, background included:
ground truth j receives about k_j queries, fewer when its queries are expensive, more when they are cheap. As
the last of POT's updates is the column update, ``exact_rows=True`` ends with one more row update, which
rescales every row of POT's plan to sum to its ``a_i``. Unlike the balanced problem, a constant background cost
does change this plan (it is no longer absorbed by a potential).

Without a graph the same iterations run in scaling form, as in :mod:`detr_ot.matching.balanced`; the implicit
gradient of the strict-rows problem is in :mod:`detr_ot.matching.implicit`.
"""

from __future__ import annotations

import math

import torch

from detr_ot.matching.balanced import (
    _ABSORB_EVERY,
    _exp_floor,
    _iteration_dtype,
    log_kernel,
    logsumexp_last,
    plan_from_potentials,
)


def _exponent(strength: float, epsilon: float) -> float:
    return 1.0 if math.isinf(strength) else strength / (strength + epsilon)


def sinkhorn_unbalanced_log(
    cost: torch.Tensor,
    row_marginals: torch.Tensor,
    col_marginals: torch.Tensor,
    col_mask: torch.Tensor | None = None,
    epsilon: float = 0.05,
    tau: float = 1.0,
    tau_rows: float = math.inf,
    iters: int = 50,
    tol: float = 0.0,
    check_every: int = 10,
    exact_rows: bool = False,
) -> torch.Tensor:
    """Batched unbalanced entropic OT plan B x Q x N (module docstring).

    ``cost`` B x Q x N, ``row_marginals`` B x Q (> 0), ``col_marginals`` B x N, ``col_mask`` B x N (masked
    columns and columns of zero marginal carry no mass). ``tau`` relaxes the columns, ``tau_rows`` the rows
    (POT's ``reg_m = (tau_rows, tau)``; ``inf`` is a strict marginal). ``tol > 0``: stop once the largest
    change of the column log-potential in the batch is below ``tol`` (the marginals themselves are not met by
    design), checked every ``check_every`` iterations. ``exact_rows``: one final row update with a strict row
    marginal. Differentiable by autograd (unrolled).
    """
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn_unbalanced_log: cost must be B x Q x N, got shape {tuple(cost.shape)}")
    if not (epsilon > 0 and tau > 0 and tau_rows > 0):
        raise ValueError(f"sinkhorn_unbalanced_log: epsilon={epsilon}, tau={tau}, tau_rows={tau_rows} must be > 0")
    if col_mask is None:
        col_mask = torch.ones(cost.shape[0], cost.shape[2], dtype=torch.bool, device=cost.device)
    col_mask = col_mask & (col_marginals > 0)
    out_dtype = cost.dtype
    graph = torch.is_grad_enabled() and cost.requires_grad
    # the kernel below adds log a_i + log b_j to -C/eps: its range decides the form (see balanced.py)
    shift = 0.0
    if cost.numel():
        log_marg = torch.cat([row_marginals.detach().flatten(), col_marginals.detach()[col_mask]]).log().abs()
        shift = float(log_marg.amax())
    dtype, scaling = _iteration_dtype(cost, col_mask, epsilon, graph, extra=shift)
    cost = cost.to(dtype)
    floor = _exp_floor(dtype)
    tiny = torch.finfo(dtype).tiny
    log_a = row_marginals.to(dtype).log()
    log_b = torch.where(col_mask, col_marginals.to(dtype).clamp_min(tiny).log(), 0)
    log_k = log_kernel(cost, col_mask, epsilon)
    log_k = torch.where(col_mask[:, None, :], log_k + log_a[:, :, None] + log_b[:, None, :], log_k)
    fr, fc = _exponent(tau_rows, epsilon), _exponent(tau, epsilon)
    if scaling:
        with torch.no_grad():
            u, v = _scaling_iterations(log_k, log_a, log_b, col_mask, fr, fc, iters, tol, check_every)
    else:
        log_k_t = log_k.transpose(1, 2).contiguous()
        u = torch.zeros_like(log_a)
        v = torch.zeros_like(log_b)
        for it in range(iters):
            u = fr * (log_a - logsumexp_last(log_k + v[:, None, :], floor))
            v_new = torch.where(col_mask, fc * (log_b - logsumexp_last(log_k_t + u[:, None, :], floor)), 0)
            if tol > 0 and it % check_every == 0 and float((v_new - v).detach().abs().amax()) < tol:
                v = v_new
                break
            v = v_new
    if exact_rows:
        u = log_a - logsumexp_last(log_k + v[:, None, :], floor)
    return plan_from_potentials(log_k, u, v, col_mask, floor).to(out_dtype)


def _scaling_iterations(
    log_k: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    col_mask: torch.Tensor,
    fr: float,
    fc: float,
    iters: int,
    tol: float,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The iterations above without a graph, in scaling form: with the potentials ``u0``, ``v0`` absorbed in
    ``G = exp(log K + u0 + v0)`` and the scalings ``su = e^(u - u0)``, ``sv = e^(v - v0)``, the row update
    ``u = fr (log a - LSE_j(log K_ij + v_j))`` reads ``log su = fr (log a - log(G sv)) + (fr - 1) u0`` (and the
    same for the columns): two batched matrix-vector products and elementwise work on vectors per iteration.
    Returns the log-potentials (u, v)."""
    floor = _exp_floor(log_k.dtype)
    tiny = torch.finfo(log_k.dtype).tiny
    u0, v0 = torch.zeros_like(log_a), torch.zeros_like(log_b)
    lu, lv = torch.zeros_like(log_a), torch.zeros_like(log_b)  # log su, log sv
    kernel = kernel_t = None
    for it in range(iters):
        if it % _ABSORB_EVERY == 0:
            u0, v0 = u0 + lu, v0 + lv
            lu, lv = torch.zeros_like(lu), torch.zeros_like(lv)
            kernel = plan_from_potentials(log_k, u0, v0, col_mask, floor)
            kernel_t = kernel.transpose(1, 2).contiguous()
        gsv = torch.bmm(lv.exp()[:, None, :], kernel_t).squeeze(1)
        lu = fr * (log_a - gsv.log()) + (fr - 1) * u0
        gsu = torch.bmm(lu.exp()[:, None, :], kernel).squeeze(1).clamp_min_(tiny)
        lv_new = torch.where(col_mask, fc * (log_b - gsu.log()) + (fc - 1) * v0, 0)
        done = tol > 0 and it % check_every == 0 and float((lv_new - lv).abs().amax()) < tol
        lv = lv_new
        if done:
            break
    return u0 + lu, v0 + lv
