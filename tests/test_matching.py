"""Hungarian matcher: brute force over permutations, batched == per image, empty images, non-finite costs."""

from __future__ import annotations

import itertools

import pytest
import torch

from detr_ot.matching import MATCHERS, CostWeights, NonFiniteCostError, PaddedTargets, compute_pairwise_terms
from detr_ot.matching.hungarian import solve_hungarian


def brute_force_min(cost: torch.Tensor) -> float:
    """Minimum total cost of a one-to-one assignment of every column (Q >= M) by enumeration."""
    q, m = cost.shape
    if m == 0:
        return 0.0
    return min(sum(float(cost[r, c]) for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), m))


def random_targets(counts: list[int], gen: torch.Generator, num_classes: int = 4) -> list[dict]:
    out = []
    for i, n in enumerate(counts):
        xy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        out.append({"boxes": torch.cat([xy, wh], 1), "labels": torch.randint(num_classes, (n,), generator=gen),
                    "image_id": 100 + i})
    return out


@pytest.mark.parametrize("q,m", [(3, 1), (4, 3), (5, 5), (6, 2), (5, 0)])
def test_solver_matches_brute_force(q: int, m: int) -> None:
    gen = torch.Generator().manual_seed(q * 10 + m)
    for _ in range(5):
        cost = torch.randn(1, q, m, generator=gen, dtype=torch.float64)
        plan = solve_hungarian(cost, torch.ones(1, m, dtype=torch.bool))
        assert plan.shape == (1, q, m + 1)
        gt_plan = plan[0, :, 1:]
        assert torch.all(gt_plan.sum(0) == 1)  # every ground truth matched exactly once
        assert torch.all(plan[0].sum(1) == 1)  # every query in exactly one column (background included)
        assert float((gt_plan * cost[0]).sum()) == pytest.approx(brute_force_min(cost[0]), abs=1e-12)


def test_batched_equals_per_image_and_empty_images() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1]
    targets = random_targets(counts, gen)
    logits = torch.randn(len(counts), 7, 5, generator=gen)
    boxes = torch.rand(len(counts), 7, 4, generator=gen) * 0.5 + 0.25
    matcher = MATCHERS.build("hungarian", CostWeights(1.0, 5.0, 2.0))
    batched = matcher(compute_pairwise_terms(logits, boxes, PaddedTargets.from_list(targets, "cpu")))
    assert batched.hard and batched.plan.shape == (4, 7, 6)
    for b, t in enumerate(targets):
        one = PaddedTargets.from_list([t], "cpu")
        single = matcher(compute_pairwise_terms(logits[b : b + 1], boxes[b : b + 1], one))
        n = counts[b]
        assert torch.equal(batched.plan[b, :, : n + 1], single.plan[0])
        assert torch.all(batched.plan[b, :, n + 1 :] == 0)  # padded columns carry no mass
    assert torch.all(batched.plan[1, :, 0] == 1)  # the zero-target image: everything to background


def test_cost_is_detr_cost() -> None:
    """The cost the matcher minimises is w_class * (-p[c]) + w_bbox * L1 - w_giou * GIoU, element by element."""
    from torchvision.ops import box_convert, generalized_box_iou

    gen = torch.Generator().manual_seed(1)
    targets = random_targets([4], gen)
    logits = torch.randn(1, 6, 5, generator=gen)
    boxes = torch.rand(1, 6, 4, generator=gen) * 0.5 + 0.25
    terms = compute_pairwise_terms(logits, boxes, PaddedTargets.from_list(targets, "cpu"), "prob")
    prob = logits[0].softmax(-1)[:, targets[0]["labels"]]
    l1 = torch.cdist(boxes[0], targets[0]["boxes"], p=1)
    xyxy = box_convert(boxes[0], "cxcywh", "xyxy")
    giou = generalized_box_iou(xyxy, box_convert(targets[0]["boxes"], "cxcywh", "xyxy"))
    torch.testing.assert_close(terms.class_cost[0], -prob)
    torch.testing.assert_close(terms.l1[0], l1)
    torch.testing.assert_close(terms.giou[0], giou)


def test_non_finite_cost_names_image_and_term() -> None:
    gen = torch.Generator().manual_seed(2)
    targets = random_targets([2, 2], gen)
    logits = torch.randn(2, 4, 5, generator=gen)
    logits[1, 2, 0] = float("nan")
    boxes = torch.rand(2, 4, 4, generator=gen) * 0.5 + 0.25
    matcher = MATCHERS.build("hungarian", CostWeights())
    with pytest.raises(NonFiniteCostError, match=r"image id 101 .*class"):
        matcher(compute_pairwise_terms(logits, boxes, PaddedTargets.from_list(targets, "cpu")))
    logits[1, 2, 0] = 0.0
    boxes[0, 1, 0] = float("inf")
    with pytest.raises(NonFiniteCostError, match=r"image id 100 .*bbox_l1"):
        matcher(compute_pairwise_terms(logits, boxes, PaddedTargets.from_list(targets, "cpu")))
