"""Balanced entropic optimal transport, batched over the images of a batch (the numerics of the Sinkhorn matcher).

Problem (Cuturi, "Sinkhorn Distances", NeurIPS 2013; Peyre & Cuturi, "Computational Optimal Transport", 2019,
eq. 4.2): ``min_{S >= 0} <S, C> - eps H(S)`` s.t. ``S 1 = a``, ``S^T 1 = b``. The solution is
``S = diag(e^u) K diag(e^v)`` with ``K = exp(-C / eps)`` (Peyre & Cuturi, Prop. 4.3), and Sinkhorn's iterations
(eq. 4.15) alternate ``v = log b - LSE_i(-C/eps + u)`` and ``u = log a - LSE_j(-C/eps + v)``, here written in the
log domain (Peyre & Cuturi, sec. 4.4) in the update order of POT's ``sinkhorn_log``, so that a fixed iteration
count gives POT's plan, not only the converged one.

Two ways to run the same iterations:
  * :func:`sinkhorn_log` with autograd recording (the unrolled gradient): log-sum-exp in every step;
  * without a graph (no-grad forward, the implicit gradient's forward, the detached plan) and when the kernel
    fits the floating-point range (``max|C| / eps`` at most ``_KERNEL_RANGE``), the scaling form: ``u``, ``v``
    are absorbed into a kernel ``exp(-C/eps + u + v)`` every ``_ABSORB_EVERY`` iterations and the steps in
    between are two batched matrix-vector products (Peyre & Cuturi, sec. 4.4, absorption). The sequence of
    iterates is the same; only rounding differs.
"""

from __future__ import annotations

import math

import torch

_PROMOTE_RANGE = 2.0**14  # max|C|/eps above which float32 costs are iterated in float64 (see sinkhorn_log)
# max|C|/eps up to which the scaling form is safe: entries of exp(-C/eps) in [e^-R, e^R] and scalings within a
# few such factors stay far inside the dtype's range (float32: e^+-88; float64: e^+-709).
_KERNEL_RANGE = {torch.float32: 25.0, torch.float64: 250.0}
_ABSORB_EVERY = 50


def _masked_fill_value(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf in the log-kernel of masked columns: it never wins a max, its exp() term is
    clamped away, and no inf - inf = NaN can appear in the forward or backward pass."""
    return -torch.finfo(dtype).max / 4


def _exp_floor(dtype: torch.dtype) -> float:
    """Exponents below this are clamped before exp(): their terms are < 1e-36 of the largest (zero for the
    result), and exp() of arguments that underflow to subnormals is ~40x slower on x86 CPUs."""
    return math.log(torch.finfo(dtype).tiny) + 4.0


def logsumexp_last(x: torch.Tensor, floor: float) -> torch.Tensor:
    """log-sum-exp over the last dimension, shifted by the (detached, hence constant) max and clamped at
    ``floor``; faster than ``torch.logsumexp`` here, same value to rounding."""
    m = x.detach().amax(-1, keepdim=True)
    return x.sub(m).clamp_min_(floor).exp_().sum(-1).log_() + m.squeeze(-1)


def plan_from_potentials(
    log_k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, col_mask: torch.Tensor, floor: float
) -> torch.Tensor:
    """exp(log K_ij + u_i + v_j); masked columns exactly 0."""
    log_plan = (log_k + u[:, :, None] + v[:, None, :]).clamp_min(floor)
    return torch.where(
        col_mask[:, None, :], log_plan.exp(), torch.zeros((), dtype=log_k.dtype, device=log_k.device)
    )


def log_kernel(cost: torch.Tensor, col_mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """-C / eps on real columns, a large finite negative number on masked ones."""
    neg = _masked_fill_value(cost.dtype)
    return torch.where(col_mask[:, None, :], -cost / epsilon, torch.full_like(cost, neg))


def _iteration_dtype(
    cost: torch.Tensor, col_mask: torch.Tensor, epsilon: float, graph: bool, extra: float = 0.0
) -> tuple[torch.dtype, bool]:
    """(dtype to iterate in, whether the scaling form applies). ``extra``: a bound on what the kernel adds to
    |C| / eps. One host sync (the cost's dynamic range)."""
    dtype = torch.float32 if cost.dtype in (torch.float16, torch.bfloat16) else cost.dtype
    if cost.numel() == 0:
        return dtype, False
    magnitude = cost.detach().abs()
    # |C| times the mask is exact on real entries and 0 on finite padded ones (cheaper than a broadcast where);
    # inf or NaN, from a padded entry or a real one, falls back to the where, which ignores the padded ones
    largest = float(magnitude.mul(col_mask[:, None, :]).amax())
    if not math.isfinite(largest):
        largest = float(torch.where(col_mask[:, None, :], magnitude, 0).amax())
    dynamic_range = largest / epsilon + extra
    if not graph and dynamic_range <= _KERNEL_RANGE.get(dtype, 0.0):
        return dtype, True
    if not graph and dynamic_range <= _KERNEL_RANGE[torch.float64]:  # the scaling form in float64 is still
        return torch.float64, True  # much cheaper than the log domain in float32
    if dtype != torch.float64 and dynamic_range > _PROMOTE_RANGE:
        return torch.float64, False
    return dtype, False


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
    """Batched entropic OT plan (module docstring).

    ``cost`` B x Q x N, ``row_marginals`` B x Q (> 0), ``col_marginals`` B x N, ``col_mask`` B x N (True for
    real columns; masked columns, and columns of zero marginal, carry no mass). Returns the plan B x Q x N.

    Each iteration is a column update then a row update (POT's ``sinkhorn_log`` order), so every row of the
    returned plan sums to its ``a_i`` exactly. ``tol > 0``: stop once the largest absolute column-marginal
    violation in the batch is below ``tol``, checked every ``check_every`` iterations (one host sync each);
    ``tol == 0`` runs exactly ``iters`` iterations without a per-iteration sync. Differentiable by autograd
    (unrolled) when ``cost`` requires grad; no loop over images.

    Precision: the log-plan ``-C/eps + u + v`` cancels terms of size max|C|/eps, so in float32 the plan's
    relative error is about 6e-8 * max|C|/eps. When max|C|/eps exceeds ``2**14`` a lower-precision cost is
    therefore iterated in float64 and the plan cast back; half-precision costs are iterated in float32 at least.
    """
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn_log: cost must be B x Q x N, got shape {tuple(cost.shape)}")
    if col_mask is None:
        col_mask = torch.ones(cost.shape[0], cost.shape[2], dtype=torch.bool, device=cost.device)
    col_mask = col_mask & (col_marginals > 0)
    out_dtype = cost.dtype
    graph = torch.is_grad_enabled() and cost.requires_grad
    dtype, scaling = _iteration_dtype(cost, col_mask, epsilon, graph)
    cost = cost.to(dtype)
    a = row_marginals.to(dtype)
    b = torch.where(col_mask, col_marginals.to(dtype), 0)
    if scaling:
        with torch.no_grad():  # -C/eps on every column: the kernel zeroes the masked ones itself
            return _scaling_iterations(cost / -epsilon, a, b, col_mask, iters, tol, check_every).to(out_dtype)
    log_k = log_kernel(cost, col_mask, epsilon)
    floor = _exp_floor(dtype)
    log_k_t = log_k.transpose(1, 2).contiguous()  # the column update reduces over a contiguous last dim
    log_a = a.log()
    log_b = torch.where(col_mask, b.clamp_min(torch.finfo(dtype).tiny).log(), torch.zeros_like(b))
    zero_b = torch.zeros_like(b)
    u = torch.zeros_like(log_a)
    v = zero_b
    for it in range(iters):
        v = torch.where(col_mask, log_b - logsumexp_last(log_k_t + u[:, None, :], floor), zero_b)
        u = log_a - logsumexp_last(log_k + v[:, None, :], floor)
        if tol > 0 and it % check_every == 0:
            with torch.no_grad():
                cols = plan_from_potentials(log_k, u, v, col_mask, floor).sum(1)
                err = torch.where(col_mask, cols - b, zero_b).abs().amax()
            if float(err) < tol:
                break
    return plan_from_potentials(log_k, u, v, col_mask, floor).to(out_dtype)


def _scaling_iterations(
    neg_cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    col_mask: torch.Tensor,
    iters: int,
    tol: float,
    check_every: int,
) -> torch.Tensor:
    """The iterations of :func:`sinkhorn_log` in scaling form (no graph) on ``neg_cost = -C / eps``: the
    log-potentials ``u``, ``v`` live in the kernel ``G = exp(-C/eps + u + v)`` (masked columns 0), the scalings
    ``su``, ``sv`` (both 1 after an absorption) are updated by ``sv = b / (G^T su)``, ``su = a / (G sv)``, which
    is ``v += log sv``, ``u += log su``. Everything per iteration writes into buffers allocated once: the
    iterations are tiny, so the number of operator calls, not arithmetic, sets their cost."""
    batch, q, n = neg_cost.shape
    floor = _exp_floor(neg_cost.dtype)
    tiny = torch.finfo(neg_cost.dtype).tiny
    ceiling = math.log(torch.finfo(neg_cost.dtype).max) / 2  # far above the range the scaling form accepts
    hidden = ~col_mask[:, None, :]
    # Row vectors (B x 1 x len): G^T su as (1 x Q) @ (Q x N) and G sv as (1 x N) @ (N x Q), the fast batched
    # matrix-vector shape; masked columns have b = 0, hence sv = 0 exactly, and zero kernel columns.
    a_row, b_row = a.reshape(batch, 1, q), b.reshape(batch, 1, n)
    su, sv = torch.ones_like(a_row), torch.ones_like(b_row)
    col_sums, row_sums = torch.empty_like(b_row), torch.empty_like(a_row)
    u = v = None
    kernel = kernel_t = neg_cost
    for it in range(iters):
        if it % _ABSORB_EVERY == 0:
            if it:
                u = su.log().view(batch, q, 1) if u is None else u + su.log().view(batch, q, 1)
                v = (sv.log() if v is None else v + sv.log()).masked_fill_(hidden, 0)
                su.fill_(1.0)
                sv.fill_(1.0)
                kernel = (neg_cost + u + v).clamp_min_(floor).exp_().masked_fill_(hidden, 0)
            else:  # masked columns may hold inf or NaN: bounded, then zeroed by a multiplication (the real
                # entries, within the scaling form's range, are untouched by the upper bound and the NaN fill)
                kernel = neg_cost.clamp(floor, ceiling).nan_to_num_(0.0).exp_().mul_(col_mask[:, None, :])
            kernel_t = kernel.transpose(1, 2).contiguous()
        torch.bmm(su, kernel, out=col_sums)
        torch.div(b_row, col_sums.clamp_min_(tiny), out=sv)
        torch.bmm(sv, kernel_t, out=row_sums)
        torch.div(a_row, row_sums, out=su)
        if tol > 0 and it % check_every == 0:
            cols = torch.bmm(su, kernel) * sv
            if float((cols - b_row).masked_fill_(hidden, 0).abs().amax()) < tol:
                break
    return kernel.mul_(su.view(batch, q, 1)).mul_(sv)
