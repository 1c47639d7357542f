"""Sinkhorn matcher: against POT, brute force, the Hungarian limit, finite differences, padding."""

from __future__ import annotations

import itertools
import math

import numpy as np
import ot
import pytest
import torch
from conftest import matcher_gradient_probe

from detr_ot.matching import MATCHERS, CostWeights, PairwiseTerms
from detr_ot.matching.hungarian import solve_hungarian
from detr_ot.matching.sinkhorn import SinkhornMatcher, SinkhornOptions, sinkhorn_log

L1_ONLY = CostWeights(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)  # matching_cost == terms.l1


def make_terms(cost: torch.Tensor, gt_mask: torch.Tensor) -> PairwiseTerms:
    """Terms whose matching cost under ``L1_ONLY`` is ``cost`` (padded entries zeroed)."""
    cost = cost * gt_mask[:, None, :].to(cost.dtype)
    zero = torch.zeros_like(cost)
    return PairwiseTerms(cost, zero, zero, gt_mask, list(range(100, 100 + cost.shape[0])))


def random_problem(counts: list[int], queries: int, seed: int, dtype=torch.float64, m: int | None = None):
    g = torch.Generator().manual_seed(seed)
    m = max(counts) if m is None else m
    cost = torch.rand(len(counts), queries, m, generator=g, dtype=dtype) * 4 - 1
    mask = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    return cost * mask[:, None, :].to(dtype), mask


def marginals(queries: int, mask: torch.Tensor, dtype=torch.float64):
    counts = mask.sum(1)
    rows = torch.ones(mask.shape[0], queries, dtype=dtype)
    cols = torch.cat([(queries - counts)[:, None].to(dtype), mask.to(dtype)], 1)
    col_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
    return rows, cols, col_mask


def with_background(cost: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    return torch.cat([torch.full_like(cost[..., :1], value), cost], -1)


@pytest.mark.parametrize("iters", [1, 3, 25])
def test_plan_equals_pot_at_fixed_iterations(iters):
    """Same update order as POT's sinkhorn_log: identical plans even before convergence."""
    cost, mask = random_problem([4], 9, seed=1)
    rows, cols, col_mask = marginals(9, mask)
    full = with_background(cost)
    ours = sinkhorn_log(full, rows, cols, col_mask, epsilon=0.1, iters=iters)[0].numpy()
    ref = ot.sinkhorn(
        rows[0].numpy(),
        cols[0].numpy(),
        full[0].numpy(),
        0.1,
        method="sinkhorn_log",
        numItermax=iters,
        stopThr=0.0,
        warn=False,
    )
    assert np.abs(ours - ref).max() < 1e-10


def test_converged_plan_equals_pot_and_marginals_hold():
    counts, q = [5, 2, 7, 0, 9], 9  # includes an image with no ground truth and one with M == Q
    cost, mask = random_problem(counts, q, seed=2)
    rows, cols, col_mask = marginals(q, mask)
    plan = sinkhorn_log(with_background(cost), rows, cols, col_mask, epsilon=0.2, iters=5000, tol=1e-12)
    assert torch.allclose(plan.sum(2), rows, atol=1e-12)  # rows: exact (the last update is the row update)
    assert torch.allclose(plan.sum(1), cols, atol=1e-9)  # columns: b_0 = Q - M, b_j = 1, padded 0
    assert torch.all(plan[:, :, 1:][~mask[:, None, :].expand(-1, q, -1)] == 0)  # padded columns: no mass
    for b, n in enumerate(counts):
        if not 0 < n < q:
            continue
        a_b, b_b, c_b = (
            rows[b].numpy(),
            cols[b, : n + 1].numpy(),
            with_background(cost)[b, :, : n + 1].numpy(),
        )
        ref = ot.sinkhorn(a_b, b_b, c_b, 0.2, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
        assert np.abs(plan[b, :, : n + 1].numpy() - ref).max() < 1e-5
    assert torch.all(plan[3, :, 0] == 1)  # no ground truth: everything is background
    assert torch.all(plan[4, :, 0] == 0)  # M == Q: the background column has zero capacity


def _brute_force_costs(cost: torch.Tensor) -> list[float]:
    q, m = cost.shape
    return sorted(float(sum(cost[p[j], j] for j in range(m))) for p in itertools.permutations(range(q), m))


def test_epsilon_to_zero_recovers_hungarian():
    """Random 6 x 3 problems whose optimum beats the runner-up by >= 0.15 (brute force): the plan tends to
    the Hungarian assignment as epsilon shrinks."""
    g = torch.Generator().manual_seed(0)
    kept = []
    while len(kept) < 6:
        c = torch.rand(6, 3, generator=g, dtype=torch.float64)
        best = _brute_force_costs(c)
        if best[1] - best[0] > 0.15:
            kept.append(c)
    cost = torch.stack(kept)
    mask = torch.ones(6, 3, dtype=torch.bool)
    rows, cols, col_mask = marginals(6, mask)
    hungarian = solve_hungarian(cost, mask)
    errors = []
    for eps in (0.1, 0.03, 0.01):
        plan = sinkhorn_log(with_background(cost), rows, cols, col_mask, eps, iters=3000, tol=1e-7)
        errors.append(float((plan - hungarian).abs().max()))
    assert errors[0] > 0.3  # far from hard at a large epsilon (the test can tell)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02
    assert torch.equal(plan.argmax(-1), hungarian.argmax(-1))


def test_gradcheck_unrolled_plan():
    cost, mask = random_problem([3, 2], 4, seed=3)
    rows, cols, col_mask = marginals(4, mask)
    full = with_background(cost).requires_grad_(True)

    def fn(c):
        return sinkhorn_log(c, rows, cols, col_mask, epsilon=0.3, iters=15)

    assert torch.autograd.gradcheck(fn, (full,), eps=1e-6, atol=1e-6)


def test_no_nan_at_small_epsilon_and_large_costs():
    torch.manual_seed(0)
    counts, q = [12, 1, 0, 20], 20
    cost, mask = random_problem(counts, q, seed=4, dtype=torch.float32)
    cost = (cost * 1e3 / 3).requires_grad_(True)  # costs up to ~1e3 in magnitude
    rows, cols, col_mask = marginals(q, mask, torch.float32)
    plan = sinkhorn_log(with_background(cost), rows, cols, col_mask, epsilon=1e-3, iters=30)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(2), rows, atol=1e-4)
    (plan * torch.randn_like(plan)).sum().backward()
    assert torch.isfinite(cost.grad).all()
    # the matcher on the raw (unnormalised) cost, straight-through included
    for mode, grad in (("soft", "unrolled"), ("hard", "straight_through")):
        c = cost.detach().clone().requires_grad_(True)
        opts = SinkhornOptions(epsilon=1e-3, iters=30, normalize="none", mode=mode, gradient=grad)
        out = SinkhornMatcher(L1_ONLY, opts)(make_terms(c, mask)).plan
        assert torch.isfinite(out).all()
        (out * torch.randn_like(out)).sum().backward()
        assert torch.isfinite(c.grad).all()


def test_padding_invariance():
    """An image's plan does not depend on the other images, on extra padded columns or on an empty image."""
    cost, mask = random_problem([3, 6], 8, seed=5, dtype=torch.float32)
    matcher = SinkhornMatcher(L1_ONLY)
    alone = matcher(make_terms(cost[:1, :, :3], mask[:1, :3])).plan
    batch = matcher(make_terms(cost, mask)).plan
    assert torch.allclose(batch[0, :, :4], alone[0], atol=1e-6)
    assert torch.all(batch[0, :, 4:] == 0)
    # an empty image and 4 extra padded columns (with garbage cost entries, which must be ignored)
    pad = torch.full((2, 8, 4), 123.0)
    cost2 = torch.cat([torch.cat([cost, pad], 2), torch.randn(1, 8, 10)], 0)
    mask2 = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    mask2 = torch.cat([mask2, torch.zeros(1, 10, dtype=torch.bool)])
    terms = make_terms(cost2, mask2)
    terms.l1 = cost2  # bypass the zeroing in make_terms: the padded entries really hold garbage
    padded = matcher(terms).plan
    assert torch.allclose(padded[:2, :, :7], batch, atol=1e-6)
    assert torch.all(padded[:2, :, 7:] == 0)
    assert torch.all(padded[2, :, 0] == 1) and torch.all(padded[2, :, 1:] == 0)


def test_matcher_pot_backend_matches_torch_backend_plan_and_gradient():
    cost, mask = random_problem([4, 2, 0], 7, seed=6)
    out = {}
    for backend in ("torch", "pot"):
        c = cost.clone().requires_grad_(True)
        opts = SinkhornOptions(epsilon=0.1, iters=40, backend=backend)
        plan = SinkhornMatcher(L1_ONLY, opts)(make_terms(c, mask)).plan
        (plan * torch.linspace(-1, 1, plan.numel(), dtype=plan.dtype).view_as(plan)).sum().backward()
        out[backend] = (plan.detach(), c.grad)
    assert torch.allclose(out["torch"][0], out["pot"][0], atol=1e-5)
    assert torch.allclose(out["torch"][1], out["pot"][1], atol=1e-5)
    assert out["torch"][1].abs().sum() > 0


def test_hard_mode_is_the_most_probable_assignment_of_the_plan():
    """Rounding: the one-to-one assignment maximising prod S over the (M+1)-column problem (brute force on
    log S) equals solve_hungarian on the cost, for an unconverged plan too."""
    q, m = 6, 3
    cost, mask = random_problem([m, m], q, seed=7)
    rows, cols, col_mask = marginals(q, mask)
    for iters in (2, 200):
        plan = sinkhorn_log(with_background(cost), rows, cols, col_mask, epsilon=0.5, iters=iters)
        logp = plan.log()
        for b in range(2):
            best, best_perm = -math.inf, None
            for p in itertools.permutations(range(q), m):
                bg = [i for i in range(q) if i not in p]
                score = float(sum(logp[b, p[j], j + 1] for j in range(m)) + logp[b, bg, 0].sum())
                if score > best:
                    best, best_perm = score, p
            hung = solve_hungarian(cost[b : b + 1], mask[b : b + 1])[0]
            assert [int(hung[:, j + 1].argmax()) for j in range(m)] == list(best_perm)
    opts = SinkhornOptions(mode="hard", gradient="detached")
    hard = SinkhornMatcher(L1_ONLY, opts)(make_terms(cost, mask))
    assert hard.hard and torch.equal(hard.plan, solve_hungarian(cost, mask))


def test_straight_through_forward_is_hard_and_backward_is_soft():
    cost, mask = random_problem([3, 5], 6, seed=8)
    weights = torch.randn(2, 6, 6, dtype=torch.float64)
    grads = {}
    for mode, grad in (("soft", "unrolled"), ("hard", "straight_through")):
        c = cost.clone().requires_grad_(True)
        a = SinkhornMatcher(L1_ONLY, SinkhornOptions(mode=mode, gradient=grad))(make_terms(c, mask))
        (a.plan * weights).sum().backward()
        grads[mode] = c.grad
        if mode == "hard":
            assert torch.allclose(a.plan.detach(), solve_hungarian(cost, mask), atol=1e-12)
    assert torch.allclose(grads["soft"], grads["hard"])
    c = cost.clone().requires_grad_(True)
    plan = SinkhornMatcher(L1_ONLY, SinkhornOptions(gradient="detached"))(make_terms(c, mask)).plan
    assert not plan.requires_grad


def test_constant_background_cost_and_tolerance():
    cost, mask = random_problem([4, 1], 6, seed=9)
    base = SinkhornMatcher(L1_ONLY, SinkhornOptions(iters=30))(make_terms(cost, mask)).plan
    moved_bg = SinkhornOptions(iters=30, background_cost=0.7)
    moved = SinkhornMatcher(L1_ONLY, moved_bg)(make_terms(cost, mask)).plan
    assert torch.allclose(base, moved, atol=1e-12)  # a constant C_i0 is absorbed by the column potential
    rows, cols, col_mask = marginals(6, mask)
    plan = sinkhorn_log(with_background(cost), rows, cols, col_mask, epsilon=0.05, iters=10_000, tol=1e-6)
    assert (plan.sum(1) - cols).abs().max() < 1e-6
    short = sinkhorn_log(with_background(cost), rows, cols, col_mask, epsilon=0.05, iters=2)
    assert (short.sum(1) - cols).abs().max() > 1e-3  # 2 iterations are not converged: the check can fail


def test_normalisation_and_epsilon_annealing():
    cost, mask = random_problem([4, 3], 6, seed=10)
    scaled = cost * torch.tensor([3.0, 0.5], dtype=cost.dtype)[:, None, None]
    for how in ("max", "mean"):  # per image, so rescaling an image's cost changes nothing
        m = SinkhornMatcher(L1_ONLY, SinkhornOptions(normalize=how))
        assert torch.allclose(m(make_terms(cost, mask)).plan, m(make_terms(scaled, mask)).plan, atol=1e-10)
    m = SinkhornMatcher(L1_ONLY, SinkhornOptions(normalize="none"))
    assert not torch.allclose(m(make_terms(cost, mask)).plan, m(make_terms(scaled, mask)).plan, atol=1e-3)

    m = SinkhornMatcher(L1_ONLY, SinkhornOptions(epsilon=0.01, epsilon_start=1.0))
    m.set_epoch(0, 5)
    assert m.epsilon == pytest.approx(1.0)
    m.set_epoch(2, 5)
    assert m.epsilon == pytest.approx(0.1)  # geometric midpoint
    m.set_epoch(4, 5)
    assert m.epsilon == pytest.approx(0.01)
    lin = SinkhornMatcher(L1_ONLY, SinkhornOptions(epsilon=0.01, epsilon_start=1.0, anneal="linear"))
    lin.set_epoch(2, 5)
    assert lin.epsilon == pytest.approx(0.505)


def test_options_validation_and_registry():
    assert MATCHERS.get("sinkhorn") is SinkhornMatcher and MATCHERS.options("sinkhorn") is SinkhornOptions
    for bad in (
        {"mode": "hard", "gradient": "unrolled"},
        {"gradient": "straight_through"},
        {"normalize": "sum"},
        {"epsilon": 0.0},
        {"backend": "jax"},
    ):
        with pytest.raises(ValueError):
            SinkhornOptions(**bad)
    cost, mask = random_problem([5], 4, seed=11, m=5)
    with pytest.raises(ValueError, match="image id 100"):
        SinkhornMatcher(L1_ONLY)(make_terms(cost, mask))


def test_gradient_reaches_model_parameters():
    """Through a plan-weighted loss with constant per-pair losses, the only path to the parameters is through
    the matching cost: the unrolled plan passes a gradient, the detached one does not."""
    for grad_mode, expect in (("unrolled", True), ("detached", False)):
        _, grad = matcher_gradient_probe(SinkhornMatcher(CostWeights(), SinkhornOptions(gradient=grad_mode)))
        if grad is None:
            assert not expect
        else:
            assert (grad > 0) == expect


@pytest.mark.parametrize("dtype,dynamic_range", [(torch.float32, 25.0), (torch.float64, 250.0), (torch.float32, 200.0)])
def test_no_graph_scaling_form_equals_log_domain_iterations(dtype, dynamic_range):
    """Without a graph the iterations run in scaling form (float64 when float32's range is exceeded): the same
    iterates as the float64 log domain at fixed iteration counts, at the edge of the range, with supplies and
    block-structured costs, across an absorption of the potentials (iters > 50)."""
    g = torch.Generator().manual_seed(12)
    cost = torch.rand(3, 40, 9, generator=g, dtype=torch.float64) * 2 - 1
    cost[0] = 1.0
    cost[0, :10, 1:] = -1.0  # a quarter of the queries cheap for every ground truth, the rest expensive
    eps = 0.05
    cost = (cost / cost.abs().amax() * dynamic_range * eps).to(dtype).double()  # exactly representable in dtype
    k = torch.randint(1, 5, (3, 8), generator=g).double()
    cols = torch.cat([40 - k.sum(1, keepdim=True), k], 1)
    rows = torch.ones(3, 40, dtype=torch.float64)
    for iters in (3, 70):
        ref = sinkhorn_log(cost.clone().requires_grad_(True), rows, cols, None, eps, iters).detach()
        with torch.no_grad():
            plan = sinkhorn_log(cost.to(dtype), rows.to(dtype), cols.to(dtype), None, eps, iters)
        assert plan.dtype == dtype and torch.isfinite(plan).all()
        # float64: rounding; float32 iterated in float64 (range > 25): the final cast; float32: ~1e-7 * range
        tol = 1e-11 if dtype == torch.float64 else (1e-6 if dynamic_range > 25 else 2e-5)
        assert (plan.double() - ref).abs().max() < tol
    if dynamic_range <= 25:  # the tolerance stop in scaling form (at larger ranges convergence takes too long)
        with torch.no_grad():
            plan = sinkhorn_log(cost.to(dtype), rows.to(dtype), cols.to(dtype), None, eps, 10_000, tol=1e-4)
        assert (plan.double().sum(1) - cols).abs().max() < 1e-4


def test_no_graph_scaling_form_with_masked_columns_equals_log_domain():
    """The scaling form zeroes masked columns in its kernel once: padded columns holding inf, NaN or huge costs
    and a real column of zero supply change nothing, across absorptions (iters > 100), with the tolerance stop;
    reference: the float64 log domain with autograd recording, on the same padded problem."""
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(4, 30, 7, generator=g, dtype=torch.float64)
    col_mask = torch.ones(4, 7, dtype=torch.bool)
    col_mask[1, 5:] = False
    col_mask[2, 3:] = False
    cost[1, :, 5] = math.inf
    cost[1, :, 6] = math.nan
    cost[2, :, 3:] = -1e30
    k = torch.randint(1, 4, (4, 6), generator=g).double()
    k[3, 2] = 0.0  # a real column of zero supply carries no mass either
    k = torch.where(col_mask[:, 1:], k, torch.zeros_like(k))
    cols = torch.cat([30 - k.sum(1, keepdim=True), k], 1)
    rows = torch.ones(4, 30, dtype=torch.float64)
    eps = 0.05
    for iters in (1, 120):
        ref = sinkhorn_log(cost.clone().requires_grad_(True), rows, cols, col_mask, eps, iters).detach()
        with torch.no_grad():
            plan = sinkhorn_log(cost, rows, cols, col_mask, eps, iters)
        assert torch.isfinite(ref).all() and torch.isfinite(plan).all()
        assert (plan - ref).abs().max() < 1e-11
        assert (plan[~(col_mask & (cols > 0))[:, None, :].expand_as(plan)] == 0).all()
    with torch.no_grad():
        plan = sinkhorn_log(cost.float(), rows.float(), cols.float(), col_mask, eps, 10_000, tol=1e-4)
    assert (plan.double().sum(1) - cols).abs().max() < 1e-4
    assert (plan[~(col_mask & (cols > 0))[:, None, :].expand_as(plan)] == 0).all()


def test_iteration_dtype_ignores_padded_columns():
    """The range check that selects the scaling form reads real entries only: inf, NaN or huge padded costs do
    not push a small-range problem off it, while a large real entry does (float64, then the log domain)."""
    from detr_ot.matching.balanced import _iteration_dtype

    cost = torch.rand(2, 5, 4)
    col_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    for pad in (math.inf, -math.inf, math.nan, 1e30):
        padded = cost.clone()
        padded[0, :, 2:] = pad
        assert _iteration_dtype(padded, col_mask, 0.05, graph=False) == (torch.float32, True)
    padded = cost.clone()
    padded[1, 3, 0] = 100 * 0.05  # a real entry: max|C| / eps = 100, beyond float32's scaling range
    assert _iteration_dtype(padded, col_mask, 0.05, graph=False) == (torch.float64, True)
    padded[1, 3, 0] = 1e4 * 0.05
    assert _iteration_dtype(padded, col_mask, 0.05, graph=False) == (torch.float32, False)
    padded[1, 3, 0] = math.inf
    assert _iteration_dtype(padded, col_mask, 0.05, graph=False) == (torch.float64, False)
