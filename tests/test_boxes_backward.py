"""The fused pairwise IoU/GIoU (``pairwise_iou_giou``, hand-written backward) against the plain autograd formula
it replaced (``_reference_iou_giou``) and against finite differences (``torch.autograd.gradcheck``), in float64,
on random and degenerate boxes: identical, disjoint, touching, nested, collapsed, padded (all-zero) columns."""

from __future__ import annotations

import pytest
import torch

from detr_ot.boxes import _reference_iou_giou, cxcywh_to_xyxy, pairwise_giou, pairwise_iou_giou
from detr_ot.matching import CostWeights, PaddedTargets, compute_pairwise_terms, matching_cost

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_xyxy(batch: int, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    centre = torch.rand(batch, n, 2, generator=gen, dtype=dtype)
    size = torch.rand(batch, n, 2, generator=gen, dtype=dtype) * 0.5 + 0.01
    return cxcywh_to_xyxy(torch.cat([centre, size], -1))


def grads(fn, b1: torch.Tensor, b2: torch.Tensor, w_iou: torch.Tensor | None, w_giou: torch.Tensor | None):
    """Values and d/d(b1, b2) of sum(w_iou * iou + w_giou * giou) (a term left out when its weight is None)."""
    b1, b2 = b1.detach().clone().requires_grad_(True), b2.detach().clone().requires_grad_(True)
    iou, giou = fn(b1, b2)
    loss = sum(((w * x).sum() for w, x in ((w_iou, iou), (w_giou, giou)) if w is not None), torch.zeros(()))
    return (iou.detach(), giou.detach()), torch.autograd.grad(loss, (b1, b2))


def degenerate_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """One image: predictions against ground truths with every degenerate relation of the issue. Several
    pairs hold exact ties of the min/max (equal coordinates) and clamps exactly at their bound."""
    pred = torch.tensor(
        [
            [0.1, 0.1, 0.4, 0.4],  # identical to gt 0
            [0.6, 0.6, 0.9, 0.8],  # disjoint from gt 0, shares x1 with gt 2
            [0.4, 0.1, 0.7, 0.4],  # touches gt 0 along x = 0.4
            [0.2, 0.2, 0.3, 0.3],  # inside gt 0
            [0.5, 0.5, 0.5, 0.5],  # collapsed to a point
            [0.0, 0.0, 0.0, 0.0],  # collapsed at the origin: zero-area enclosing box with the padded column
            [0.1, 0.7, 0.6, 0.7],  # a horizontal segment: zero area, yet d area / d y = width is not 0
        ],
        dtype=torch.float64,
    )
    gt = torch.tensor(
        [
            [0.1, 0.1, 0.4, 0.4],
            [0.5, 0.5, 0.5, 0.5],  # collapsed, equal to pred 4
            [0.65, 0.05, 0.9, 0.3],
            [0.0, 0.0, 0.0, 0.0],  # a padded column
            [0.2, 0.7, 0.9, 0.7],  # a segment on the same line as pred 6: union and hull clamped, widths not 0
        ],
        dtype=torch.float64,
    )
    return pred[None], gt[None]


@pytest.mark.parametrize("device", DEVICES)
def test_values_equal_the_autograd_formula(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    b1, b2 = random_xyxy(3, 17, gen).to(device), random_xyxy(3, 6, gen).to(device)
    b2[1, -2:] = 0  # padded columns
    for dtype in (torch.float64, torch.float32):
        ours, ref = pairwise_iou_giou(b1.to(dtype), b2.to(dtype)), _reference_iou_giou(b1.to(dtype), b2.to(dtype))
        for x, y in zip(ours, ref, strict=True):
            assert x.dtype == dtype and x.shape == (3, 17, 6)
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    pred, gt = degenerate_pairs()
    for x, y in zip(pairwise_iou_giou(pred, gt), _reference_iou_giou(pred, gt), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(pairwise_giou(b1, b2), _reference_iou_giou(b1, b2)[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("outputs", ["both", "iou", "giou"])
def test_gradients_equal_the_autograd_formula(device: str, outputs: str) -> None:
    """Random boxes (no ties), and both boxes' gradients, for either output alone or both."""
    gen = torch.Generator().manual_seed(1)
    b1, b2 = random_xyxy(2, 13, gen).to(device), random_xyxy(2, 5, gen).to(device)
    w_iou = torch.randn(2, 13, 5, generator=gen, dtype=torch.float64).to(device) if outputs != "giou" else None
    w_giou = torch.randn(2, 13, 5, generator=gen, dtype=torch.float64).to(device) if outputs != "iou" else None
    _, ours = grads(pairwise_iou_giou, b1, b2, w_iou, w_giou)
    _, ref = grads(_reference_iou_giou, b1, b2, w_iou, w_giou)
    for x, y in zip(ours, ref, strict=True):
        assert x.abs().max() > 0.1  # the comparison is not between zeros
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gradients_at_ties_and_clamps_follow_autograds_convention() -> None:
    """Identical, touching, collapsed and padded pairs: at a min/max tie each box gets half (autograd's
    convention), a clamp exactly at its bound passes nothing (as autograd's clamp), and every gradient is
    finite even where 0 / 0 is guarded."""
    pred, gt = degenerate_pairs()
    gen = torch.Generator().manual_seed(2)
    w_iou, w_giou = (torch.randn(1, 7, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    _, ours = grads(pairwise_iou_giou, pred, gt, w_iou, w_giou)
    _, ref = grads(_reference_iou_giou, pred, gt, w_iou, w_giou)
    for x, y in zip(ours, ref, strict=True):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_touching_boxes_pass_no_iou_gradient_through_the_clamped_width() -> None:
    """Hand-worked: pred touches gt along x = 0.4, so the intersection width is clamped exactly at 0 and IoU = 0
    passes no gradient (autograd's clamp convention), even though moving pred's x0 left would overlap."""
    pred = torch.tensor([[[0.4, 0.1, 0.7, 0.4]]], dtype=torch.float64, requires_grad=True)
    gt = torch.tensor([[[0.1, 0.1, 0.4, 0.4]]], dtype=torch.float64)
    iou, giou = pairwise_iou_giou(pred, gt)
    assert float(iou.detach()) == 0.0 and float(giou.detach()) == 0.0  # hull = union: two 0.3 x 0.3 boxes side by side
    (grad,) = torch.autograd.grad(iou.sum(), pred)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("case", ["random", "identical", "disjoint", "nested", "near_touching"])
def test_gradcheck_against_finite_differences(case: str) -> None:
    """Central differences average the one-sided slopes, which is the half-and-half split at the min/max ties
    of identical boxes; touching boxes (a clamp at its bound, where autograd's convention takes
    the one-sided zero) are checked against the autograd formula above, here a gap of 1e-3 on either side."""
    gen = torch.Generator().manual_seed(3)
    if case == "random":
        b1, b2 = random_xyxy(2, 4, gen), random_xyxy(2, 3, gen)
    else:
        base = torch.tensor([[0.1, 0.2, 0.4, 0.5], [0.3, 0.3, 0.8, 0.6]], dtype=torch.float64)
        shift = {"identical": 0.0, "nested": None, "disjoint": None, "near_touching": 0.3 + 1e-3}[case]
        if case == "nested":
            other = base + torch.tensor([0.05, 0.05, -0.05, -0.05], dtype=torch.float64)
        elif case == "disjoint":  # apart in x and y, without equal coordinates
            other = base + torch.tensor([0.55, 0.37, 0.57, 0.39], dtype=torch.float64)
        else:
            other = base + torch.tensor([shift, 0.0, shift, 0.0], dtype=torch.float64)
        if case == "near_touching":
            other = torch.cat([other, base + torch.tensor([0.3 - 1e-3, 0.0, 0.3 - 1e-3, 0.0], dtype=torch.float64)])
        b1, b2 = base[None], other[None]
    b1, b2 = b1.clone().requires_grad_(True), b2.clone().requires_grad_(True)
    # at a kink the central difference is the mean slope up to O(eps) curvature terms, hence atol >> eps
    assert torch.autograd.gradcheck(pairwise_iou_giou, (b1, b2), eps=1e-7, atol=1e-5, rtol=1e-5)


def test_gradient_only_where_needed_and_in_each_inputs_dtype() -> None:
    gen = torch.Generator().manual_seed(4)
    b1 = random_xyxy(1, 5, gen, torch.float32).requires_grad_(True)
    b2 = random_xyxy(1, 3, gen, torch.float64)  # promoted like autograd's broadcasting: float64 outputs
    iou, giou = pairwise_iou_giou(b1, b2)
    assert iou.dtype == giou.dtype == torch.float64
    (grad,) = torch.autograd.grad(giou.sum(), b1)
    assert grad.dtype == torch.float32
    ref_b1 = b1.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(_reference_iou_giou(ref_b1, b2)[1].sum(), ref_b1)
    torch.testing.assert_close(grad, ref.float(), rtol=1e-6, atol=1e-6)


def test_float32_gradients_close_to_float64() -> None:
    """In float32 the backward rounds differently from autograd's; both stay within float32 rounding of the
    float64 gradient (scaled by the gradient's size)."""
    gen = torch.Generator().manual_seed(5)
    b1, b2 = random_xyxy(4, 20, gen), random_xyxy(4, 9, gen)
    w = torch.randn(4, 20, 9, generator=gen, dtype=torch.float64)
    _, exact = grads(_reference_iou_giou, b1, b2, w, w)
    _, ours = grads(pairwise_iou_giou, b1.float(), b2.float(), w.float(), w.float())
    for x, y in zip(ours, exact, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=0, atol=1e-4 * float(y.abs().max()))


def test_second_derivative_raises() -> None:
    gen = torch.Generator().manual_seed(6)
    b1 = random_xyxy(1, 3, gen).requires_grad_(True)
    giou = pairwise_iou_giou(b1, random_xyxy(1, 2, gen))[1]
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(giou.sum(), b1, create_graph=True)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="boxes1 must be"):
        pairwise_iou_giou(torch.zeros(3, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="boxes2 must be"):
        pairwise_iou_giou(torch.zeros(1, 3, 4), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="batch sizes differ"):
        pairwise_iou_giou(torch.zeros(2, 3, 4), torch.zeros(1, 2, 4))


def test_pairwise_terms_under_autocast_match_the_plain_run() -> None:
    """Under CPU autocast the boxes keep their float32 (min/max/products are not autocast ops): the terms and
    their gradients are the ones of the plain run."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 6, 5, generator=gen)
    boxes = torch.rand(2, 6, 4, generator=gen) * 0.5 + 0.25
    targets = [
        {"boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.25, "labels": torch.randint(4, (n,), generator=gen)}
        for n in (3, 1)
    ]
    padded = PaddedTargets.from_list(targets, "cpu")
    results = []
    for enabled in (False, True):
        leaf = boxes.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            terms = compute_pairwise_terms(logits, leaf, padded)
            cost = matching_cost(terms, CostWeights(), detach=False)
        results.append((terms.giou.detach(), terms.iou.detach(), *torch.autograd.grad(cost.sum(), leaf)))
    for x, y in zip(*results, strict=True):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("shapes", [((2, 3), (2, 0)), ((2, 0), (2, 4)), ((0, 3), (0, 2))])
def test_empty_inputs(shapes: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """Images without ground truths (M = 0), no queries, an empty batch: empty outputs and zero gradients."""
    (b, n), (_, m) = shapes
    b1 = torch.rand(b, n, 4, dtype=torch.float64, requires_grad=True)
    b2 = torch.rand(b, m, 4, dtype=torch.float64, requires_grad=True)
    iou, giou = pairwise_iou_giou(b1, b2)
    assert iou.shape == giou.shape == (b, n, m)
    g1, g2 = torch.autograd.grad((iou + giou).sum(), (b1, b2))
    assert torch.equal(g1, torch.zeros_like(b1)) and torch.equal(g2, torch.zeros_like(b2))
