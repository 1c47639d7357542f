"""GU matcher: Hungarian forward, Generalized-Update backward, against brute force and closed forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import SHAPES_YAML, matcher_gradient_probe

from detr_ot.build import build_criterion
from detr_ot.config import load_config
from detr_ot.matching import MATCHERS, CostWeights, PairwiseTerms
from detr_ot.matching.gu import GUMatcher, GUOptions, gu_assign
from detr_ot.matching.hungarian import HungarianMatcher, solve_hungarian

L1_ONLY = CostWeights(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)  # matching_cost == terms.l1


def random_problem(counts: list[int], queries: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = max(counts)
    cost = torch.rand(len(counts), queries, m, generator=g, dtype=dtype)
    mask = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    grad = torch.randn(len(counts), queries, m + 1, generator=g, dtype=dtype)
    return cost * mask[:, None, :].to(dtype), mask, grad


def backward_of(cost: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, **options) -> torch.Tensor:
    """dL/dC of ``<P(C), g>`` through GU; ``scale`` 1 unless given (the rules themselves, not the defaults)."""
    c = cost.clone().requires_grad_(True)
    plan = gu_assign(c, mask, GUOptions(**{"scale": 1.0, **options}), training=True)
    (plan * g).sum().backward()
    return c.grad


def brute_force_full(cost_full: torch.Tensor, m: int) -> torch.Tensor:
    """Exact (M+1)-column problem for one image: every gt j (columns 1..m) gets one query, the other Q - M
    queries go to column 0 with their own (possibly query-dependent) cost cost_full[i, 0]."""
    q = cost_full.shape[0]
    best, best_plan = math.inf, None
    for perm in itertools.permutations(range(q), m):
        plan = torch.zeros(q, m + 1, dtype=cost_full.dtype)
        plan[:, 0] = 1
        for j, i in enumerate(perm):
            plan[i, 0], plan[i, j + 1] = 0, 1
        total = float((plan * cost_full[:, : m + 1]).sum())
        if total < best - 1e-12:
            best, best_plan = total, plan
    return best_plan


def test_forward_is_hungarian_and_m_column_reduction_is_exact():
    cost, mask, _ = random_problem([3, 2, 1], 5, seed=0)
    plan = gu_assign(cost, mask, GUOptions())
    assert torch.equal(plan, solve_hungarian(cost, mask))
    for b, n in enumerate([3, 2, 1]):  # constant background cost: the M-column solve is the full problem's
        full = torch.cat([torch.full((5, 1), 0.37, dtype=cost.dtype), cost[b, :, :n]], 1)
        assert torch.equal(plan[b, :, : n + 1], brute_force_full(full, n))


def test_default_scale_and_projection_per_target():
    """Defaults that trained on the shapes ablation (README, "GU targets"): blackbox at full weight; identity
    (mean_norm projection) and perturbed at 0.05. An explicit scale is kept."""
    assert GUOptions().target == "blackbox" and GUOptions().scale == 1.0
    assert GUOptions(target="identity").scale == 0.05 and GUOptions(target="identity").projection == "mean_norm"
    assert GUOptions(target="perturbed").scale == 0.05
    assert GUOptions(target="perturbed", scale=2.0).scale == 2.0
    with pytest.raises(ValueError):
        GUOptions(scale=-1.0)


def test_identity_returns_minus_g():
    cost, mask, g = random_problem([3, 2], 5, seed=1)
    m = mask[:, None, :].to(g.dtype)
    g0 = g.clone()
    g0[..., 0] = 0  # no background gradient: the rule is exactly -g on the gt columns
    assert torch.allclose(backward_of(cost, mask, g0, target="identity", projection="none"), -g0[..., 1:] * m)
    # with a background gradient: the relevant difference g_ij - g_i0 (module docstring)
    expect = -(g[..., 1:] - g[..., :1]) * m
    assert torch.allclose(backward_of(cost, mask, g, target="identity", projection="none"), expect)
    scaled = backward_of(cost, mask, g, target="identity", projection="none", scale=0.05, per_query=True)
    assert torch.allclose(scaled, expect * 0.05 / 5)


def test_identity_projections():
    cost, mask, g = random_problem([3, 2], 6, seed=2)
    m = mask[:, None, :].to(g.dtype)
    gr = (g[..., 1:] - g[..., :1]) * m
    mean = backward_of(cost, mask, g, target="identity", projection="mean")
    assert torch.allclose(mean.sum(1), torch.zeros_like(mean.sum(1)), atol=1e-12)  # zero column means
    assert torch.allclose(mean, -(gr - gr.mean(1, keepdim=True)) * m)
    assert mean.abs().sum() > 0
    norm = backward_of(cost, mask, g, target="identity", projection="norm")  # tangent to the sphere at C
    assert torch.allclose((norm * cost).sum((1, 2)), torch.zeros(2, dtype=g.dtype), atol=1e-12)
    # against autograd through P_norm (002 eq. 11): -d/dC <P_norm(C), g'> with g' held fixed
    c = cost.clone().requires_grad_(True)
    flat = c * m
    norms = flat.pow(2).sum((1, 2), keepdim=True).sqrt()
    (-(flat / norms) * gr).sum().backward()
    assert torch.allclose(norm, c.grad * m, atol=1e-12)
    std = backward_of(cost, mask, g, target="identity", projection="mean_norm")
    centred = (cost - cost.mean(1, keepdim=True)) * m
    assert torch.allclose(std.sum(1), torch.zeros_like(std.sum(1)), atol=1e-12)
    assert torch.allclose((std * centred).sum((1, 2)), torch.zeros(2, dtype=g.dtype), atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_blackbox_equals_brute_force_interpolation(seed):
    """-(P(C) - P(C + lambda g)) / lambda with P the exact (M+1)-column solver applied to the full perturbed
    cost, whose background column C_i0 + lambda g_i0 varies per query."""
    q, counts, lam = 5, [3, 2], 1.5
    cost, mask, g = random_problem(counts, q, seed=10 + seed)
    got = backward_of(cost, mask, g, target="blackbox", lam=lam)
    expect = torch.zeros_like(cost)
    for b, n in enumerate(counts):
        full = torch.cat([torch.zeros(q, 1, dtype=cost.dtype), cost[b, :, :n]], 1)
        p = brute_force_full(full, n)
        p_lam = brute_force_full(full + lam * g[b, :, : n + 1], n)
        expect[b, :, :n] = -(p - p_lam)[:, 1:] / lam
    assert torch.allclose(got, expect)
    assert expect.abs().sum() > 0  # lambda large enough that the target differs from P (the test can fail)


def test_perturbed_matches_smoothed_derivative_on_2x1():
    """Q = 2, M = 1, background cost 0: query 0 takes the gt iff c0 + sigma Z0 < c1 + sigma Z1, so
    E[P(C + sigma Z)]_{0,1} = Phi((c1 - c0) / (sigma sqrt 2)) and the smoothed loss <g, E[P]> has the exact
    derivative dL/dc0 = -(g'_0 - g'_1) phi(d) / (sigma sqrt 2) = -dL/dc1, with g'_i = g_i1 - g_i0."""
    torch.manual_seed(0)
    sigma, k = 0.5, 20_000
    cost = torch.tensor([[[0.2], [0.5]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    g = torch.tensor([[[0.3, 1.0], [-0.4, -0.9]]], dtype=torch.float64)
    opts = GUOptions(target="perturbed", sigma=sigma, samples=k, forward="mean", scale=1.0)
    c = cost.clone().requires_grad_(True)
    plan = gu_assign(c, mask, opts)
    (plan * g).sum().backward()
    s = sigma * math.sqrt(2.0)
    d = float(cost[0, 1, 0] - cost[0, 0, 0]) / s
    phi = math.exp(-d * d / 2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(d / math.sqrt(2)))
    gr = g[0, :, 1] - g[0, :, 0]
    exact = float(gr[0] - gr[1]) * phi / s
    # per-sample terms are bounded by |g'_0 - g'_1| |Z| / sigma: 5 standard errors
    tol = 5 * abs(float(gr[0] - gr[1])) / (sigma * math.sqrt(k))
    assert abs(float(c.grad[0, 0, 0]) - (-exact)) < tol
    assert abs(float(c.grad[0, 1, 0]) - exact) < tol
    assert abs(float(plan.detach()[0, 0, 1]) - big_phi) < 5 * 0.5 / math.sqrt(k)  # forward=mean is E[P] too
    assert abs(exact) > 5 * tol  # a sign error, or a scale error of sqrt(2), cannot pass


def test_margin_noise_only_in_training():
    cost, mask, _ = random_problem([4], 6, seed=3)
    opts = GUOptions(margin=10.0)  # noise far larger than the cost spread
    assert torch.equal(gu_assign(cost, mask, opts, training=False), solve_hungarian(cost, mask))
    torch.manual_seed(0)
    noisy = [gu_assign(cost, mask, opts, training=True) for _ in range(5)]
    assert any(not torch.equal(p, solve_hungarian(cost, mask)) for p in noisy)


def test_empty_and_options():
    assert MATCHERS.get("gu") is GUMatcher and MATCHERS.options("gu") is GUOptions
    zero = torch.zeros(2, 4, 0)
    terms = PairwiseTerms(zero, zero, zero, torch.zeros(2, 0, dtype=torch.bool), [1, 2])
    a = GUMatcher(L1_ONLY)(terms)
    assert a.plan.shape == (2, 4, 1) and torch.all(a.plan == 1)
    for bad in ({"target": "sinkhorn"}, {"projection": "std"}, {"forward": "mean"}, {"lam": 0.0}):
        with pytest.raises(ValueError):
            GUOptions(**bad)


@pytest.mark.parametrize(
    "options",
    [
        {"target": "identity"},
        {"target": "identity", "projection": "mean_norm", "margin": 0.1},
        {"target": "blackbox"},
        {"target": "perturbed", "samples": 4},
        {"target": "perturbed", "samples": 4, "forward": "mean"},
    ],
)
def test_gradient_reaches_model_parameters(options):
    """Through a plan-weighted loss with constant per-pair losses, the only path to the parameters is the
    Generalized Update through the matching cost: GU passes a gradient, plain Hungarian does not."""
    gu = GUMatcher(CostWeights(), GUOptions(**options))
    for matcher, expect in ((gu, True), (HungarianMatcher(CostWeights()), False)):
        plan, grad = matcher_gradient_probe(matcher, loss_scale=10.0)
        assert torch.allclose(plan.sum(-1), torch.ones(2, 10))
        if expect:
            assert grad is not None and grad > 0
        else:
            assert grad is None


def _criterion_gradients(overrides: list[str]) -> torch.Tensor:
    """Gradient of the set loss on (logits, boxes) of one fixed random batch."""
    criterion = build_criterion(load_config(SHAPES_YAML, ["loss.cls=focal", "loss.cls_weight=2", *overrides]), 3)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 12, 3, generator=gen) * 2).requires_grad_(True)
    boxes = torch.rand(4, 12, 4, generator=gen).mul(0.5).add(0.25).requires_grad_(True)
    targets = [{"labels": torch.randint(0, 3, (n,), generator=gen),
                "boxes": torch.rand(n, 4, generator=gen).mul(0.5).add(0.25)} for n in (3, 5, 1, 4)]
    criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)["loss"].backward()
    return torch.cat([logits.grad.flatten(), boxes.grad.flatten()])


@pytest.mark.parametrize("cost_class, silent", [(2.0, True), (1.0, False)])
def test_blackbox_is_silent_when_the_matching_cost_is_the_loss(cost_class: float, silent: bool) -> None:
    """Focal class cost with cost weights equal to the loss weights (the shapes preset): the set loss's reduced
    gradient g' is C / num_boxes plus a constant (the GIoU loss is 1 - GIoU), so C + lambda g' orders every
    assignment as C does, P(C + lambda g') = P(C), and the blackbox update is exactly zero: GU then trains
    exactly like Hungarian (the shapes ablation's GU and Hungarian runs are bit-identical). A class cost weight
    that differs from the loss weight (here 1 vs 2) makes the update act."""
    common = [f"matcher.cost_class={cost_class}", "matcher.gu.lam=50"]
    hungarian = _criterion_gradients(["matcher.name=hungarian", *common])
    gu = _criterion_gradients(["matcher.name=gu", "matcher.gu.target=blackbox", *common])
    assert torch.equal(gu, hungarian) == silent


@pytest.mark.parametrize("cost_class, silent", [(2.0, True), (1.0, False)])
def test_identity_with_mean_norm_projection_is_silent_when_the_matching_cost_is_the_loss(
    cost_class: float, silent: bool
) -> None:
    """The same setting for identity with ``projection=mean_norm``: g' = C / N + const lies along the centred
    cost, whose only effect on the solver would be a rescaling, and P_norm' removes exactly that direction
    (002 eq. 14), so the update vanishes (to float32 rounding). Without the projection identity pushes every pair's
    cost by its own loss value (the runs that collapsed); with a class cost weight unlike the loss's it acts."""
    common = [f"matcher.cost_class={cost_class}"]
    hungarian = _criterion_gradients(["matcher.name=hungarian", *common])
    gu = _criterion_gradients(["matcher.name=gu", "matcher.gu.target=identity", "matcher.gu.projection=mean_norm",
                               *common])
    none = _criterion_gradients(["matcher.name=gu", "matcher.gu.target=identity", "matcher.gu.projection=none",
                                 *common])
    diff = (gu - hungarian).abs().max().item()
    assert (diff < 1e-5) == silent, diff  # float32 rounding: ~7e-7 when silent, 0.4 when not
    assert (none - hungarian).abs().max().item() > 1e-2  # the unprojected update always acts
