"""One-to-many supplies: OTA's dynamic k by hand, the Q < sum k guard, the exact one-to-many assignment against
brute force and POT's exact solver, balanced Sinkhorn with supplies against POT, the matchers end to end through
the set criterion."""

from __future__ import annotations

import itertools

import numpy as np
import ot
import pytest
import torch

from detr_ot.build import build_criterion
from detr_ot.config import ConfigError, load_config
from detr_ot.matching import MATCHERS, CostWeights, PaddedTargets, PairwiseTerms, compute_pairwise_terms
from detr_ot.matching.balanced import sinkhorn_log
from detr_ot.matching.hungarian import solve_hungarian
from detr_ot.matching.sinkhorn import SinkhornMatcher, SinkhornOptions
from detr_ot.matching.supply import (
    OneToManyMatcher,
    OneToManyOptions,
    SupplyOptions,
    column_marginals,
    dynamic_k,
    fit_supplies,
    solve_one_to_many,
    supplies,
)

L1_ONLY = CostWeights(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)  # matching_cost == terms.l1


def make_terms(cost: torch.Tensor, gt_mask: torch.Tensor, iou: torch.Tensor | None = None) -> PairwiseTerms:
    cost = cost * gt_mask[:, None, :].to(cost.dtype)
    zero = torch.zeros_like(cost)
    return PairwiseTerms(cost, zero, zero, gt_mask, list(range(100, 100 + cost.shape[0])), iou=iou)


def random_problem(counts: list[int], queries: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = max(counts)
    cost = torch.rand(len(counts), queries, m, generator=g, dtype=dtype) * 4 - 1
    mask = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    return cost * mask[:, None, :].to(dtype), mask


def test_dynamic_k_hand_worked() -> None:
    """Dyadic IoUs (exact sums). Ground truth 0: top-3 of (.75, .5, .25, .125) = 1.5 -> 1; ground truth 1:
    top-3 of (1, .75, .75, .5) = 2.5 -> 2; ground truth 2: .125 -> floor 0, raised to 1; padded column 3 -> 0.
    With q = 10 > Q the sum runs over all 4 queries: 1.625 -> 1, 3.0 -> 3."""
    iou = torch.tensor([[[0.75, 1.0, 0.125, 0.9], [0.5, 0.75, 0.0, 0.9], [0.25, 0.75, 0.0, 0.9],
                         [0.125, 0.5, 0.0, 0.9]]])
    mask = torch.tensor([[True, True, True, False]])
    assert dynamic_k(iou, mask, topq=3).tolist() == [[1, 2, 1, 0]]
    assert dynamic_k(iou, mask, topq=10).tolist() == [[1, 3, 1, 0]]
    terms = make_terms(torch.zeros(1, 4, 4), mask, iou=iou)
    assert supplies(terms, SupplyOptions(supply="dynamic", topq=3)).tolist() == [[1, 2, 1, 0]]
    assert supplies(terms, SupplyOptions(supply="fixed", k=3)).tolist() == [[1, 1, 1, 0]]  # 9 > Q = 4: fitted
    assert supplies(terms, SupplyOptions()).tolist() == [[1, 1, 1, 0]]
    with pytest.raises(ValueError, match="IoU"):
        supplies(make_terms(torch.zeros(1, 4, 4), mask), SupplyOptions(supply="dynamic"))


def test_supplies_that_do_not_fit_are_scaled_down() -> None:
    """k_j <- 1 + floor((k_j - 1)(Q - M) / (sum k - M)) where sum k > Q. Image 0 (Q = 5): (10, 1, 1, 1) -> spare
    1, excess 9 -> (2, 1, 1, 1). Image 1: (6, 6, 6) -> 1 + floor(5 * 1 / 15) = 1 each. Image 2 fits: unchanged."""
    k = torch.tensor([[10, 1, 1, 1], [6, 6, 6, 0], [2, 1, 2, 0]])
    mask = k > 0
    assert fit_supplies(k, mask, 5, [0, 1, 2]).tolist() == [[2, 1, 1, 1], [1, 1, 1, 0], [2, 1, 2, 0]]
    assert fit_supplies(torch.tensor([[6, 6, 6]]), torch.ones(1, 3, dtype=torch.bool), 10, [0]).tolist() == [
        [3, 3, 3]  # 1 + floor(5 * 7 / 15)
    ]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # the rule's guarantees on random supplies
        q = int(torch.randint(1, 30, (1,), generator=g))
        counts = torch.randint(0, q + 1, (4,), generator=g)
        mask = torch.arange(q)[None, :] < counts[:, None]
        k = torch.randint(1, 12, (4, q), generator=g) * mask
        fitted = fit_supplies(k, mask, q, list(range(4)))
        assert torch.all(fitted.sum(1) <= q)
        assert torch.all((fitted >= 1) | ~mask) and torch.all(fitted <= k) and torch.all(fitted[~mask] == 0)
        fits = k.sum(1) <= q
        assert torch.equal(fitted[fits], k[fits])
    with pytest.raises(ValueError, match="image id 7 .*3 ground truths but only 2 queries"):
        fit_supplies(torch.ones(1, 3, dtype=torch.int64), torch.ones(1, 3, dtype=torch.bool), 2, [7])


def brute_force(cost: np.ndarray, k: list[int]) -> list[tuple[float, tuple[int, ...]]]:
    """Every assignment of the Q queries to background (0) or ground truth j (j + 1) with exactly k_j queries on
    ground truth j, sorted by cost."""
    q, m = cost.shape
    out = []
    for labels in itertools.product(range(m + 1), repeat=q):
        if all(labels.count(j + 1) == k[j] for j in range(m)):
            out.append((sum(cost[i, c - 1] for i, c in enumerate(labels) if c > 0), labels))
    return sorted(out)


@pytest.mark.parametrize("q,k", [(6, [2, 3]), (5, [1, 2, 2]), (6, [3]), (4, [1, 1]), (6, [2, 1, 1])])
def test_one_to_many_exact_against_brute_force_and_emd(q: int, k: list[int]) -> None:
    g = torch.Generator().manual_seed(q * 100 + sum(k))
    for _ in range(4):
        cost = torch.randn(1, q, len(k), generator=g, dtype=torch.float64)
        supply = torch.tensor([k])
        plan = solve_one_to_many(cost, supply, torch.ones(1, len(k), dtype=torch.bool))[0]
        assert torch.all(plan.sum(1) == 1) and plan[:, 1:].sum(0).tolist() == k
        assert plan[:, 0].sum() == q - sum(k)
        ranked = brute_force(cost[0].numpy(), k)
        ours = float((plan[:, 1:] * cost[0]).sum())
        assert ours == pytest.approx(ranked[0][0], abs=1e-12)
        # POT's exact network simplex on the (M+1)-column problem with a zero background column
        full = np.concatenate([np.zeros((q, 1)), cost[0].numpy()], 1)
        b = np.array([q - sum(k), *k], dtype=np.float64)
        emd = ot.emd(np.ones(q), b, full)
        assert float((emd * full).sum()) == pytest.approx(ranked[0][0], abs=1e-12)
        if ranked[1][0] - ranked[0][0] > 1e-9:  # unique optimum: the plans agree
            best = np.zeros((q, len(k) + 1))
            best[np.arange(q), ranked[0][1]] = 1
            assert np.array_equal(plan.numpy(), best)
            assert np.abs(emd - best).max() < 1e-12


def test_one_to_many_batched_with_padding_and_k_one_is_hungarian() -> None:
    cost, mask = random_problem([3, 1, 2], 8, seed=1)
    k = torch.tensor([[2, 3, 1], [4, 0, 0], [1, 1, 0]])
    plan = solve_one_to_many(cost, k, mask)
    for b in range(3):
        n = int(mask[b].sum())
        alone = solve_one_to_many(cost[b : b + 1, :, :n], k[b : b + 1, :n], mask[b : b + 1, :n])
        assert torch.equal(plan[b, :, : n + 1], alone[0])
        assert torch.all(plan[b, :, n + 1 :] == 0)
    assert plan[..., 1:].sum(1).tolist() == k.tolist()
    assert torch.equal(solve_one_to_many(cost, mask.long(), mask), solve_hungarian(cost, mask))


@pytest.mark.parametrize("iters", [1, 4, 30])
def test_balanced_sinkhorn_with_supplies_equals_pot(iters: int) -> None:
    """Non-uniform column marginals (background Q - sum k, ground truths k_j) at fixed iteration counts, with
    the graph (log domain) and without (scaling form)."""
    cost, mask = random_problem([3, 2], 9, seed=2)
    k = torch.tensor([[3, 1, 2], [2, 4, 0]])
    cols = column_marginals(k, 9, torch.float64)
    full = torch.cat([torch.zeros_like(cost[..., :1]), cost], -1)
    col_mask = torch.cat([torch.ones(2, 1, dtype=torch.bool), mask], 1)
    rows = torch.ones(2, 9, dtype=torch.float64)
    with torch.no_grad():
        scaled = sinkhorn_log(full, rows, cols, col_mask, 0.1, iters)
    logd = sinkhorn_log(full.clone().requires_grad_(True), rows, cols, col_mask, 0.1, iters).detach()
    for b, n in enumerate([3, 2]):
        ref = ot.sinkhorn(np.ones(9), cols[b, : n + 1].numpy(), full[b, :, : n + 1].numpy(), 0.1,
                          method="sinkhorn_log", numItermax=iters, stopThr=0.0, warn=False)
        assert np.abs(logd[b, :, : n + 1].numpy() - ref).max() < 1e-12
        assert np.abs(scaled[b, :, : n + 1].numpy() - ref).max() < 1e-12
        assert torch.all(logd[b, :, n + 1 :] == 0) and torch.all(scaled[b, :, n + 1 :] == 0)


def test_sinkhorn_matcher_supplies_hard_and_soft() -> None:
    cost, mask = random_problem([3, 2], 9, seed=3)
    k = torch.tensor([[2, 2, 2], [3, 3, 0]])
    opts = {"supply": "fixed", "k": 2}
    soft = SinkhornMatcher(L1_ONLY, SinkhornOptions(**opts, iters=3000, tol=1e-10))(make_terms(cost, mask)).plan
    assert torch.allclose(soft.sum(2), torch.ones(2, 9, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(soft[0, :, 1:].sum(0), torch.full((3,), 2.0, dtype=torch.float64), atol=1e-9)
    hard = SinkhornMatcher(L1_ONLY, SinkhornOptions(**opts, mode="hard", gradient="detached"))
    plan = hard(make_terms(cost, mask)).plan
    assert plan[0, :, 1:].sum(0).tolist() == [2, 2, 2]
    assert torch.equal(plan[0:1], solve_one_to_many(cost[0:1], k[0:1], mask[0:1]))
    # image 1: k = 2 fits (2 * 2 <= 9); k = 5 would not: 1 + floor(4 * 7 / 8) = 4 each
    big = SinkhornMatcher(L1_ONLY, SinkhornOptions(supply="fixed", k=5, mode="hard", gradient="detached"))
    assert big(make_terms(cost, mask)).plan[1, :, 1:3].sum(0).tolist() == [4, 4]
    # straight-through: the hard one-to-many plan forward, a gradient backward
    c = cost.clone().requires_grad_(True)
    st = SinkhornMatcher(L1_ONLY, SinkhornOptions(**opts, mode="hard", gradient="straight_through"))
    out = st(make_terms(c, mask))
    assert out.hard and torch.allclose(out.plan.detach()[0], plan[0])
    (out.plan * torch.randn(out.plan.shape, dtype=torch.float64)).sum().backward()
    assert c.grad.abs().sum() > 0


def test_one_to_many_matcher_registry_and_options() -> None:
    assert MATCHERS.get("one_to_many") is OneToManyMatcher
    assert OneToManyOptions().supply == "fixed" and OneToManyOptions().k == 6  # H-DETR's default
    for bad in ({"supply": "many"}, {"k": 0}, {"topq": 0}):
        with pytest.raises(ValueError, match="matcher.one_to_many"):
            OneToManyOptions(**bad)
        with pytest.raises(ValueError, match="matcher.sinkhorn"):
            SinkhornOptions(**bad)
    with pytest.raises(ConfigError, match="supply"):
        load_config(None, ["matcher.name=one_to_many", "matcher.one_to_many.supply=many"])
    cost, mask = random_problem([2, 3], 8, seed=4)
    a = OneToManyMatcher(L1_ONLY, OneToManyOptions(k=2))(make_terms(cost, mask))
    assert a.hard and a.plan[..., 1:].sum(1).tolist() == [[2, 2, 0], [2, 2, 2]]
    b, q, g = a.matched_pairs()
    assert len(b) == 10 and torch.all(a.plan[b, q, g + 1] == 1)
    one = OneToManyMatcher(L1_ONLY, OneToManyOptions(supply="one"))(make_terms(cost, mask))
    assert torch.equal(one.plan, solve_hungarian(cost, mask))
    with pytest.raises(ValueError, match="image id 100"):
        OneToManyMatcher(L1_ONLY)(make_terms(*random_problem([5], 4, seed=5)))


@pytest.mark.parametrize(
    "matcher",
    [
        ["matcher.name=one_to_many", "matcher.one_to_many.k=2"],
        ["matcher.name=one_to_many", "matcher.one_to_many.supply=dynamic", "matcher.one_to_many.topq=3"],
        ["matcher.name=sinkhorn", "matcher.sinkhorn.supply=fixed", "matcher.sinkhorn.k=2"],
        ["matcher.name=sinkhorn", "matcher.sinkhorn.supply=fixed", "matcher.sinkhorn.k=2",
         "matcher.sinkhorn.gradient=implicit"],
        ["matcher.name=sinkhorn", "matcher.sinkhorn.supply=dynamic", "matcher.sinkhorn.marginals=unbalanced"],
    ],
)
def test_matchers_through_the_set_criterion(matcher: list[str]) -> None:
    """A tiny batch through SetCriterion: finite loss and gradient; rows sum to 1, ground-truth columns to k_j
    (balanced), the background column takes the rest."""
    cfg = load_config(None, [*matcher, "model.aux_loss=false"])
    crit = build_criterion(cfg, num_classes=3)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 4, generator=g, requires_grad=True)
    boxes = torch.rand(2, 8, 4, generator=g).mul(0.3).add(0.35).requires_grad_(True)
    targets = [
        {"boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]]), "labels": torch.tensor([0, 2]),
         "image_id": 1},
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([1]), "image_id": 2},
    ]
    out = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    padded = PaddedTargets.from_list(targets, "cpu")
    _, assignment = crit.layer_losses({"pred_logits": logits, "pred_boxes": boxes}, padded, 3.0)
    plan = assignment.plan.detach()
    assert torch.allclose(plan.sum(2), torch.ones(2, 8), atol=1e-5)
    terms = compute_pairwise_terms(logits, boxes, padded, crit.class_cost)
    k = supplies(terms, crit.matcher.options).to(plan.dtype)
    gt_mass = plan[..., 1:].sum(1)
    if "matcher.sinkhorn.marginals=unbalanced" in matcher:
        assert torch.all(gt_mass[padded.mask] > 0) and torch.all(gt_mass[~padded.mask] == 0)
    else:
        assert torch.allclose(gt_mass, k, atol=1e-3)
        assert torch.allclose(plan[..., 0].sum(1), 8 - k.sum(1), atol=1e-3)
    if "supply=dynamic" not in " ".join(matcher):
        assert torch.all(k[padded.mask] == 2)
