"""Implicit Sinkhorn gradient: equal to the unrolled gradient at convergence and to finite differences of the
converged plan (float64), with one-to-one and non-uniform supplies; through the matcher, hard mode included."""

from __future__ import annotations

import math

import torch

from detr_ot.matching import CostWeights, PairwiseTerms
from detr_ot.matching.balanced import sinkhorn_log
from detr_ot.matching.implicit import implicit_plan_vjp, sinkhorn_implicit
from detr_ot.matching.sinkhorn import SinkhornMatcher, SinkhornOptions
from detr_ot.matching.unbalanced import sinkhorn_unbalanced_log

L1_ONLY = CostWeights(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)


def problem(seed: int, counts: list[int], queries: int, supplies: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = max(counts)
    cost = torch.rand(len(counts), queries, m + 1, generator=g, dtype=dtype) * 2 - 1
    mask = torch.cat([torch.ones(len(counts), 1, dtype=torch.bool),
                      torch.arange(m)[None, :] < torch.tensor(counts)[:, None]], 1)
    k = (torch.randint(1, 4, (len(counts), m), generator=g) if supplies else torch.ones(len(counts), m))
    k = k.to(dtype) * mask[:, 1:]
    cols = torch.cat([queries - k.sum(1, keepdim=True), k], 1)
    return cost, torch.ones(len(counts), queries, dtype=dtype), cols, mask


def test_implicit_equals_unrolled_at_convergence() -> None:
    for supplies in (False, True):
        cost, rows, cols, mask = problem(0, [3, 1, 2], 8, supplies)
        weights = torch.randn(cost.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = {}
        for name, fn in (("unrolled", sinkhorn_log), ("implicit", sinkhorn_implicit)):
            c = cost.clone().requires_grad_(True)
            plan = fn(c, rows, cols, mask, 0.2, 1500)
            (plan * weights).sum().backward()
            grads[name] = c.grad
        assert torch.allclose(grads["unrolled"], grads["implicit"], atol=1e-9, rtol=0)
        assert grads["implicit"].abs().max() > 1e-2
        assert torch.all(grads["implicit"][:, :, 1:][~mask[:, 1:, None].transpose(1, 2).expand(-1, 8, -1)] == 0)


def test_implicit_gradcheck_against_finite_differences() -> None:
    """The converged plan's Jacobian (finite differences) against the implicit backward, one-to-one and with
    supplies, a padded column and an image whose background column has zero capacity (sum k = Q)."""
    for supplies in (False, True):
        cost, rows, cols, mask = problem(2, [2, 1], 4, supplies)
        if supplies:
            cols[1] = torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64)  # all 4 queries on the one ground truth

        def fn(c, rows=rows, cols=cols, mask=mask):  # noqa: ANN001, ANN202
            return sinkhorn_implicit(c, rows, cols, mask, 0.3, 5000, tol=1e-14, check_every=1)

        assert torch.autograd.gradcheck(fn, (cost.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_vjp_is_invariant_to_gradient_shifts_the_plan_ignores() -> None:
    """Adding r_i + s_j to dL/dP changes nothing (the marginals are fixed): the adjoint absorbs it exactly."""
    cost, rows, cols, mask = problem(3, [3, 2], 6, True)
    plan = sinkhorn_log(cost, rows, cols, mask, 0.25, 3000, tol=1e-13)
    g = torch.randn(plan.shape, dtype=torch.float64)
    shifted = g + torch.randn(2, 6, 1, dtype=torch.float64) + torch.randn(2, 1, 4, dtype=torch.float64)
    assert torch.allclose(implicit_plan_vjp(plan, g, 0.25), implicit_plan_vjp(plan, shifted, 0.25), atol=1e-10)


def test_matcher_implicit_gradient() -> None:
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    cost = torch.rand(2, 9, 3, generator=g, dtype=torch.float64) * 2
    terms_weights = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    grads = {}
    for name, opts in (
        ("unrolled", SinkhornOptions(supply="fixed", k=2, iters=2000, epsilon=0.1)),
        ("implicit", SinkhornOptions(supply="fixed", k=2, iters=2000, epsilon=0.1, gradient="implicit")),
        ("hard", SinkhornOptions(supply="fixed", k=2, iters=2000, epsilon=0.1, gradient="implicit", mode="hard")),
    ):
        c = cost.clone().requires_grad_(True)
        zero = torch.zeros_like(c)
        a = SinkhornMatcher(L1_ONLY, opts)(PairwiseTerms(c, zero, zero, mask, [0, 1]))
        (a.plan * terms_weights).sum().backward()
        grads[name] = c.grad
        if name == "hard":
            assert a.hard and a.plan.detach()[0, :, 1:].sum(0).tolist() == [2, 2, 2]
    assert torch.allclose(grads["unrolled"], grads["implicit"], atol=1e-8)
    assert torch.allclose(grads["hard"], grads["implicit"], atol=1e-12)  # straight through the rounding
    assert grads["implicit"].abs().sum() > 0


def test_implicit_float32_is_close_to_float64() -> None:
    cost, rows, cols, mask = problem(5, [6, 3], 20, True)
    w = torch.randn(cost.shape, dtype=torch.float64)
    out = {}
    for dtype in (torch.float32, torch.float64):
        c = cost.to(dtype).requires_grad_(True)
        (sinkhorn_implicit(c, rows.to(dtype), cols.to(dtype), mask, 0.1, 500) * w.to(dtype)).sum().backward()
        out[dtype] = c.grad.double()
    scale = out[torch.float64].abs().max()
    assert (out[torch.float32] - out[torch.float64]).abs().max() < 1e-3 * scale


def test_implicit_graph_memory_does_not_grow_with_iterations() -> None:
    """Bytes autograd saves for the backward: constant in the iteration count for the implicit gradient (the
    plan), growing with it for the unrolled one."""
    cost, rows, cols, mask = problem(6, [4, 2], 12, True, dtype=torch.float32)

    def saved_bytes(fn, iters: int) -> int:  # noqa: ANN001
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(cost.clone().requires_grad_(True), rows, cols, mask, 0.1, iters)
        return total

    assert saved_bytes(sinkhorn_implicit, 10) == saved_bytes(sinkhorn_implicit, 200) == cost.numel() * 4
    assert saved_bytes(sinkhorn_log, 200) > 10 * saved_bytes(sinkhorn_log, 10)


def test_unbalanced_implicit_equals_unrolled_and_finite_differences() -> None:
    """Strict rows, KL-relaxed columns: the implicit gradient against the unrolled one at convergence and the
    converged plan's finite differences."""
    cost, rows, cols, mask = problem(7, [3, 2], 7, True)
    weights = torch.randn(cost.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def unrolled(c):  # noqa: ANN001, ANN202
        return sinkhorn_unbalanced_log(c, rows, cols, mask, 0.2, 0.5, math.inf, 1500, exact_rows=True)

    def implicit(c):  # noqa: ANN001, ANN202
        return sinkhorn_implicit(c, rows, cols, mask, 0.2, 3000, tol=1e-14, check_every=1, tau=0.5)

    grads = []
    for fn in (unrolled, implicit):
        c = cost.clone().requires_grad_(True)
        (fn(c) * weights).sum().backward()
        grads.append(c.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-9, rtol=0) and grads[1].abs().max() > 1e-2
    small = problem(9, [2, 1], 4, True)
    rows_s, cols_s, mask_s = small[1:]

    def implicit_small(c):  # noqa: ANN001, ANN202
        return sinkhorn_implicit(c, rows_s, cols_s, mask_s, 0.3, 3000, tol=1e-14, check_every=1, tau=0.4)

    assert torch.autograd.gradcheck(implicit_small, (small[0].clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_matcher_unbalanced_implicit() -> None:
    g = torch.Generator().manual_seed(10)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    cost = torch.rand(2, 9, 3, generator=g, dtype=torch.float64) * 2
    w = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    grads = {}
    for grad in ("unrolled", "implicit"):
        c = cost.clone().requires_grad_(True)
        zero = torch.zeros_like(c)
        opts = SinkhornOptions(marginals="unbalanced", tau=0.5, supply="fixed", k=2, iters=2000, epsilon=0.1,
                               gradient=grad)
        plan = SinkhornMatcher(L1_ONLY, opts)(PairwiseTerms(c, zero, zero, mask, [0, 1])).plan
        (plan * w).sum().backward()
        grads[grad] = c.grad
    assert torch.allclose(grads["unrolled"], grads["implicit"], atol=1e-8) and grads["implicit"].abs().sum() > 0
