"""Unbalanced OT: against POT's ``sinkhorn_unbalanced`` at fixed iteration counts (float64), its limits, and the
matcher option (strict rows, POT backend equal to the batched one, plan and gradient)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch

from detr_ot.matching import CostWeights, PairwiseTerms
from detr_ot.matching.balanced import sinkhorn_log
from detr_ot.matching.sinkhorn import SinkhornMatcher, SinkhornOptions
from detr_ot.matching.unbalanced import sinkhorn_unbalanced_log

L1_ONLY = CostWeights(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)


def make_terms(cost: torch.Tensor, gt_mask: torch.Tensor) -> PairwiseTerms:
    cost = cost * gt_mask[:, None, :].to(cost.dtype)
    zero = torch.zeros_like(cost)
    return PairwiseTerms(cost, zero, zero, gt_mask, list(range(100, 100 + cost.shape[0])))


def problem(seed: int, counts: list[int], queries: int):
    g = torch.Generator().manual_seed(seed)
    m = max(counts)
    cost = torch.rand(len(counts), queries, m + 1, generator=g, dtype=torch.float64) * 2 - 0.5
    mask = torch.cat([torch.ones(len(counts), 1, dtype=torch.bool), torch.arange(m)[None, :] < torch.tensor(
        counts)[:, None]], 1)
    k = torch.randint(1, 3, (len(counts), m), generator=g).to(torch.float64) * mask[:, 1:]
    cols = torch.cat([queries - k.sum(1, keepdim=True), k], 1)
    rows = torch.ones(len(counts), queries, dtype=torch.float64)
    return cost, rows, cols, mask


def pot(a, b, m, eps, reg_m, iters, method):  # noqa: ANN001, ANN201
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge" at a fixed small iteration count
        return ot.unbalanced.sinkhorn_unbalanced(a, b, m, eps, reg_m, method=method, numItermax=iters, stopThr=0.0)


@pytest.mark.parametrize("iters", [1, 3, 40])
@pytest.mark.parametrize("tau_rows", [math.inf, 0.7])
def test_plan_equals_pot_at_fixed_iterations(iters: int, tau_rows: float) -> None:
    cost, rows, cols, mask = problem(0, [3, 2], 7)
    for eps, tau in ((0.1, 0.5), (0.3, 5.0)):
        plan = sinkhorn_unbalanced_log(cost, rows, cols, mask, eps, tau, tau_rows, iters)
        for b, n in enumerate([3, 2]):
            a_b, b_b, c_b = rows[b].numpy(), cols[b, : n + 1].numpy(), cost[b, :, : n + 1].numpy()
            ref = pot(a_b, b_b, c_b, eps, (tau_rows, tau), iters, "sinkhorn")
            assert np.abs(plan[b, :, : n + 1].numpy() - ref).max() < 1e-12
            # the stabilised variant adds 1e-16 to its denominators and absorbs nothing at these sizes
            stab = pot(a_b, b_b, c_b, eps, (tau_rows, tau), iters, "sinkhorn_stabilized")
            assert np.abs(plan[b, :, : n + 1].numpy() - stab).max() < 1e-10
            assert torch.all(plan[b, :, n + 1 :] == 0)
    # a scalar reg_m relaxes both sides alike
    plan = sinkhorn_unbalanced_log(cost, rows, cols, mask, 0.2, 0.8, 0.8, iters)
    ref = pot(rows[0].numpy(), cols[0].numpy(), cost[0].numpy(), 0.2, 0.8, iters, "sinkhorn")
    assert np.abs(plan[0].numpy() - ref).max() < 1e-12


def test_limits_and_exact_rows() -> None:
    """tau -> inf recovers the balanced plan; a small tau leaves the column marginals; exact_rows rescales POT's
    rows to sum to a."""
    cost, rows, cols, mask = problem(1, [4, 2], 8)
    bal = sinkhorn_log(cost, rows, cols, mask, 0.2, 3000, tol=1e-12)
    ub = sinkhorn_unbalanced_log(cost, rows, cols, mask, 0.2, 1e7, math.inf, 3000, exact_rows=True)
    assert (ub - bal).abs().max() < 1e-5
    loose = sinkhorn_unbalanced_log(cost, rows, cols, mask, 0.2, 0.05, math.inf, 200, exact_rows=True)
    assert torch.allclose(loose.sum(2), rows, atol=1e-12)
    assert (loose.sum(1) - cols).abs().max() > 0.1  # the test can tell balanced from unbalanced
    ref = pot(rows[0].numpy(), cols[0].numpy(), cost[0].numpy(), 0.2, (math.inf, 0.05), 200, "sinkhorn")
    ref = ref * (1 / ref.sum(1))[:, None]
    assert np.abs(loose[0].numpy() - ref).max() < 1e-12
    early = sinkhorn_unbalanced_log(cost, rows, cols, mask, 0.2, 0.05, math.inf, 5000, tol=1e-10, check_every=5)
    late = sinkhorn_unbalanced_log(cost, rows, cols, mask, 0.2, 0.05, math.inf, 5000)
    assert (early - late).abs().max() < 1e-8
    with pytest.raises(ValueError, match="tau"):
        sinkhorn_unbalanced_log(cost, rows, cols, mask, 0.2, 0.0)


def test_matcher_option_rows_strict_and_pot_backend() -> None:
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    cost = torch.rand(2, 7, 3, generator=g, dtype=torch.float64) * 3
    out = {}
    for backend in ("torch", "pot"):
        c = cost.clone().requires_grad_(True)
        opts = SinkhornOptions(marginals="unbalanced", tau=0.3, epsilon=0.1, iters=30, backend=backend,
                               supply="fixed", k=2, background_cost=0.5)
        plan = SinkhornMatcher(L1_ONLY, opts)(make_terms(c, mask)).plan
        (plan * torch.linspace(-1, 1, plan.numel(), dtype=plan.dtype).view_as(plan)).sum().backward()
        out[backend] = (plan.detach(), c.grad)
    assert torch.allclose(out["torch"][0].sum(2), torch.ones(2, 7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out["torch"][0], out["pot"][0], atol=1e-10)
    assert torch.allclose(out["torch"][1], out["pot"][1], atol=1e-8)
    assert out["torch"][1].abs().sum() > 0
    # the background cost matters for the unbalanced plan (it does not for the balanced one)
    moved = SinkhornOptions(marginals="unbalanced", tau=0.3, epsilon=0.1, iters=30, background_cost=2.0)
    base = SinkhornOptions(marginals="unbalanced", tau=0.3, epsilon=0.1, iters=30, background_cost=0.5)
    p0 = SinkhornMatcher(L1_ONLY, base)(make_terms(cost, mask)).plan
    p1 = SinkhornMatcher(L1_ONLY, moved)(make_terms(cost, mask)).plan
    assert (p0 - p1).abs().max() > 1e-2
    with pytest.raises(ValueError, match="implicit"):
        SinkhornOptions(gradient="implicit", backend="pot")
    with pytest.raises(ValueError, match="marginals"):
        SinkhornOptions(marginals="partial")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_graph_scaling_form_equals_log_domain(dtype: torch.dtype) -> None:
    """Without a graph the generalised iterations run in scaling form: the log-domain iterates at fixed counts
    (strict or relaxed rows, across an absorption at 50), and the same tolerance stop."""
    cost, rows, cols, mask = problem(3, [5, 2, 6], 30)
    for iters in (1, 7, 70):
        for tau_rows in (math.inf, 0.5):
            ref = sinkhorn_unbalanced_log(cost.clone().requires_grad_(True), rows, cols, mask, 0.1, 0.4, tau_rows,
                                          iters, exact_rows=True).detach()
            with torch.no_grad():
                plan = sinkhorn_unbalanced_log(cost.to(dtype), rows.to(dtype), cols.to(dtype), mask, 0.1, 0.4,
                                               tau_rows, iters, exact_rows=True)
            assert plan.dtype == dtype
            assert (plan.double() - ref).abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)
    ref = sinkhorn_unbalanced_log(cost.clone().requires_grad_(True), rows, cols, mask, 0.1, 0.4, math.inf, 5000,
                                  tol=1e-10).detach()
    with torch.no_grad():
        plan = sinkhorn_unbalanced_log(cost, rows, cols, mask, 0.1, 0.4, math.inf, 5000, tol=1e-10)
    assert (plan - ref).abs().max() < 1e-12
