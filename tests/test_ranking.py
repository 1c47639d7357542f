"""Tests of detr_ot/losses/ranking.py against loop-form references written from the equations.

The references below go one positive at a time over *all* negatives (no pruning, no bucketing), straight from
the formulas quoted in the docstrings of ``ranking.py`` (seed eqs. 1.3-1.5 and 2.20-2.22, aLRP sec. 4).
"""

from __future__ import annotations

import math

import pytest
import torch

from detr_ot.losses import ranking
from detr_ot.losses.ranking import (
    SelfBalance,
    alrp_loc_weights,
    alrp_loss,
    ap_loss,
    balance_by_value,
    rs_box_weights,
    rs_loss,
)

F64 = torch.float64
TOL = dict(rtol=0.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# loop-form references
# ----------------------------------------------------------------------------------------------------------
def H(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Smoothed step: 0 below -delta, 1 above +delta, linear in between, H(0) = 1/2."""
    return torch.clamp(x / (2 * delta) + 0.5, 0.0, 1.0)


def split(pos: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    return pos.nonzero().flatten().tolist(), (~pos).nonzero().flatten()


def ref_ap(s: torch.Tensor, pos: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AP Loss, one positive at a time. Returns (loss, update)."""
    P, N = split(pos)
    grad = torch.zeros_like(s)
    if not P:
        return s.new_zeros(()), grad
    prec, n_fp, h_neg = {}, {}, {}
    for i in P:
        rank_pos = 1 + sum(H(s[k] - s[i], delta) for k in P if k != i)  # rank among positives
        h_neg[i] = H(s[N] - s[i], delta)  # H(x_ij) for every negative j
        n_fp[i] = h_neg[i].sum()
        prec[i] = rank_pos / (rank_pos + n_fp[i])
    loss = s.new_zeros(())
    for i in P:
        prec_hat = max(prec[k] for k in P if s[k] <= s[i])  # interpolated precision
        err = 1 - prec_hat
        loss += err / len(P)
        grad[i] -= err / len(P)  # sum_j L_ij with L_ij = err * H(x_ij) / N_FP(i)
        if n_fp[i] > 0:
            grad[N] += err * h_neg[i] / n_fp[i] / len(P)
    return loss, grad


def ref_alrp(s, pos, e_loc, delta, eps=1e-5):
    """aLRP classification loss and update; plus a differentiable L_loc(box_loss) for the loc weights."""
    P, N = split(pos)
    grad = torch.zeros_like(s)
    if not P:
        return s.new_zeros(()), grad, None
    e = dict(zip(P, e_loc.tolist(), strict=True))
    loss = s.new_zeros(())
    rank = {}
    for i in P:
        h_neg = H(s[N] - s[i], delta)
        n_fp = h_neg.sum()
        rank_pos = 1 + sum(H(s[k] - s[i], delta) for k in P if k != i)
        rank[i] = rank_pos + n_fp
        loss += n_fp / rank[i] / len(P)
        if n_fp > eps:
            err = (n_fp + sum(H(s[k] - s[i], delta) * e[k] for k in P if k != i)) / rank[i]
            grad[i] -= err / len(P)
            grad[N] += err * h_neg / n_fp / len(P)

    def loc_smooth(box: torch.Tensor) -> torch.Tensor:
        b = dict(zip(P, box, strict=True))
        out = 0
        for i in P:
            out = out + (b[i] + sum(H(s[k] - s[i], delta) * b[k] for k in P if k != i)) / rank[i]
        return out / len(P)

    def loc_sorted(box: torch.Tensor) -> torch.Tensor:
        # the reference design: sort positives by score (descending), cumulative sums / detached rank, mean
        order = sorted(range(len(P)), key=lambda m: -float(s[P[m]]))
        cum = torch.cumsum(box[order], 0)
        ranks = torch.stack([torch.as_tensor(rank[P[m]]) for m in order])
        return (cum / ranks).mean()

    return loss, grad, {"smooth": loc_smooth, "sorted": loc_sorted}


def ref_rs(s, pos, y, delta, eps=1e-10):
    """RS Loss and update (ranking + sorting), one positive at a time."""
    P, N = split(pos)
    grad = torch.zeros_like(s)
    if not P:
        return s.new_zeros(()), grad
    y = dict(zip(P, y.tolist(), strict=True))
    Z = len(P)
    loss = s.new_zeros(())
    for i in P:
        h_neg = H(s[N] - s[i], delta)
        n_fp = h_neg.sum()
        h_pos = {k: H(s[k] - s[i], delta) for k in P}  # includes k = i (H(0) = 1/2)
        rank_pos = sum(h_pos.values())
        l_r = n_fp / (rank_pos + n_fp)
        l_s = sum(h_pos[k] * (1 - y[k]) for k in P) / rank_pos
        above = [k for k in P if y[k] >= y[i]]
        l_s_star = sum(h_pos[k] * (1 - y[k]) for k in above) / sum(h_pos[k] for k in above)
        loss += (l_r + l_s - l_s_star) / Z
        if n_fp > eps:  # ranking update
            grad[i] -= l_r / Z
            grad[N] += l_r * h_neg / n_fp / Z
        missorted = {k: h_pos[k] for k in P if y[k] < y[i]}
        denom = sum(missorted.values()) if missorted else 0.0
        if denom > eps:  # sorting update
            grad[i] -= (l_s - l_s_star) / Z
            for k, hk in missorted.items():
                grad[k] += (l_s - l_s_star) * hk / denom / Z
    return loss, grad


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def make_case(seed: int, n: int = 240, p: int = 12, delta: float = 1.0):
    """Random logits with ties, logits exactly on breakpoints s_i +- delta, and many pruned negatives."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g, dtype=F64) * 1.5
    quant = torch.rand(n, generator=g) < 0.6
    s[quant] = torch.round(s[quant] * 4) / 4  # a 0.25 grid: many ties and exact breakpoints
    pos = torch.zeros(n, dtype=torch.bool)
    pos[torch.randperm(n, generator=g)[:p]] = True
    pidx = pos.nonzero().flatten()
    s[pidx[0]] = s.max() + 2 * delta + 0.25  # top positive: N_FP = 0 (no update for aLRP / RS ranking)
    s[pidx[1]] = s[pidx[0]]  # a tie between positives
    negs = (~pos).nonzero().flatten()
    s[negs[0]] = s[pidx[2]]  # a positive-negative tie
    s[negs[1]] = s[pidx[3]] + delta  # exactly on the upper breakpoint
    s[negs[2]] = s[pidx[3]] - delta  # exactly on the lower breakpoint
    s[negs[3]] = s[pidx[4]] - delta
    low = negs[10:][torch.rand(len(negs) - 10, generator=g) < 0.5]
    s[low] -= 20.0  # far below min positive - delta: pruned
    y = torch.rand(p, generator=g, dtype=F64)
    y[0] = 0.0  # an IoU-0 positive
    y[2] = y[5]  # equal IoUs
    e_loc = torch.rand(p, generator=g, dtype=F64) * 2
    return s, pos, y, e_loc


def value_and_grad(fn, s, *args, grad_out=None, **kwargs):
    x = s.clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward(grad_out)
    return out, x.grad


# ----------------------------------------------------------------------------------------------------------
# against the references
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_ap_matches_loop_reference(seed, delta):
    s, pos, _, _ = make_case(seed, delta=delta)
    ref_loss, ref_grad = ref_ap(s, pos, delta)
    loss, grad = value_and_grad(ap_loss, s, pos, delta)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert abs(float(grad.sum())) < 1e-12
    assert (grad[pos] <= 0).all() and (grad[~pos] >= 0).all()
    assert grad.abs().max() > 1e-3  # the case is not degenerate


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_alrp_matches_loop_reference(seed, delta):
    s, pos, _, e_loc = make_case(seed, delta=delta)
    ref_loss, ref_grad, ref_loc = ref_alrp(s, pos, e_loc, delta)
    for mode in ("sorted", "smooth"):
        (loss, w), grad = value_and_grad(alrp_loss, s, pos, e_loc, delta, loc_mode=mode)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(grad, ref_grad, **TOL)
    # smooth localisation weights = d L_loc / d box_loss of the paper's formula (sorted: next test)
    box = torch.rand(int(pos.sum()), dtype=F64, requires_grad=True)
    ref_value = ref_loc["smooth"](box)
    (w_ref,) = torch.autograd.grad(ref_value, box)
    torch.testing.assert_close(w, w_ref, **TOL)
    torch.testing.assert_close((w * box).sum(), ref_value, **TOL)
    torch.testing.assert_close(w.sum(), 1 - loss.detach(), **TOL)  # weights sum to mean precision
    torch.testing.assert_close(alrp_loc_weights(s, pos, delta, mode="smooth"), w, rtol=0, atol=1e-12)
    assert abs(float(grad.sum())) < 1e-12
    assert (grad[pos] <= 0).all() and (grad[~pos] >= 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_alrp_sorted_weights_match_sort_cumsum(seed):
    """The default loc weights reproduce 'sorted by score, cumsum / detached rank, mean' (distinct scores)."""
    s, pos, _, e_loc = make_case(seed)
    pidx = pos.nonzero().flatten()
    s[pidx] = s[pidx] + torch.arange(len(pidx), dtype=F64) * 1e-3  # break the positive ties
    _, _, ref_loc = ref_alrp(s, pos, e_loc, 1.0)
    box = torch.rand(len(pidx), dtype=F64, requires_grad=True)
    ref_value = ref_loc["sorted"](box)
    (w_ref,) = torch.autograd.grad(ref_value, box)
    w = alrp_loc_weights(s, pos, 1.0)
    torch.testing.assert_close(w, w_ref, **TOL)
    _, w2 = alrp_loss(s, pos, e_loc)
    torch.testing.assert_close(w2, w_ref, **TOL)


def test_alrp_sorted_weights_ties_average_both_orders():
    """Tied positives (choice: the hard step counts a tie 1/2) get the mean of the two tie-break orders."""
    s, pos, _, e_loc = make_case(4)
    pidx = pos.nonzero().flatten()
    assert s[pidx[0]] == s[pidx[1]]  # make_case's positive tie
    box = torch.rand(len(pidx), dtype=F64, requires_grad=True)
    orders = []
    for eps in (1e-9, -1e-9):  # break the tie both ways, far below any other gap
        s2 = s.clone()
        s2[pidx[0]] += eps
        _, _, ref_loc = ref_alrp(s2, pos, e_loc, 1.0)
        orders.append(torch.autograd.grad(ref_loc["sorted"](box), box)[0])
    w = alrp_loc_weights(s, pos)
    torch.testing.assert_close(w, (orders[0] + orders[1]) / 2, **TOL)
    assert not torch.allclose(orders[0], orders[1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("delta", [0.5, 1.0])
def test_rs_matches_loop_reference(seed, delta):
    s, pos, y, _ = make_case(seed, delta=delta)
    ref_loss, ref_grad = ref_rs(s, pos, y, delta)
    (loss, l_r, l_s), grad = value_and_grad(rs_loss, s, pos, y, delta, return_parts=True)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(l_r + l_s, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert abs(float(grad.sum())) < 1e-12
    assert (grad[~pos] >= 0).all()
    assert l_s >= -1e-12


@pytest.mark.parametrize("gap", [5e-6, 2e-5])
def test_alrp_update_threshold(gap):
    """N_FP(i) <= eps: no update for i even though its error (via the tied positive's E_loc) is > 0."""
    delta = 1.0
    s = torch.tensor([4.0, 4.0, 3.0 + 2 * delta * gap, 0.5, -2.0], dtype=F64)
    pos = torch.tensor([True, True, False, True, False])
    e_loc = torch.tensor([0.5, 0.8, 0.3], dtype=F64)
    ref_loss, ref_grad, _ = ref_alrp(s, pos, e_loc, delta)  # N_FP of the top pair = gap
    (loss, _), grad = value_and_grad(alrp_loss, s, pos, e_loc, delta)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-9)  # N_FP ~ 1e-5 from a difference of sums
    assert (grad[:2] == 0).all() == (gap < 1e-5)


def test_rs_ranking_updates_signs_with_equal_ious():
    """With equal IoUs there is no sorting update: positives <= 0, negatives >= 0."""
    s, pos, _, _ = make_case(7, delta=0.5)
    y = torch.full((int(pos.sum()),), 0.7, dtype=F64)
    ref_loss, ref_grad = ref_rs(s, pos, y, 0.5)
    loss, grad = value_and_grad(rs_loss, s, pos, y)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert (grad[pos] <= 0).all() and (grad[~pos] >= 0).all()


def test_rs_iou_zero_positive_stays_positive():
    s = torch.tensor([2.0, 0.0, 1.0, 0.2, -3.0], dtype=F64)
    pos = torch.tensor([True, True, False, False, False])
    y = torch.tensor([0.9, 0.0], dtype=F64)  # the second positive has IoU 0
    ref_loss, ref_grad = ref_rs(s, pos, y, 0.5)
    loss, grad = value_and_grad(rs_loss, s, pos, y)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert grad[1] < 0  # pushed up as a positive (negatives 1.0 and 0.2 outrank it)
    # treating it as a negative instead (the IoU-as-label design) gives a different loss
    pos2 = torch.tensor([True, False, False, False, False])
    other = rs_loss(s, pos2, y[:1])
    assert abs(other.item() - loss.item()) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# structure: zero positives, chunking, grouping, dtypes, devices
# ----------------------------------------------------------------------------------------------------------
def _call(name, s, pos, **kw):
    """Each loss with per-positive targets that are a fixed function of the positive's own logit."""
    q = torch.sigmoid(3 * s.detach()[pos])  # pos_mask.nonzero() order, so groups and splits agree
    if name == "ap":
        return ap_loss(s, pos, **kw)
    if name == "alrp":
        return alrp_loss(s, pos, 1 - q, **kw)[0]
    return rs_loss(s, pos, q, **kw)


@pytest.mark.parametrize("name", ["ap", "alrp", "rs"])
def test_zero_positives(name):
    s = torch.randn(2, 50, dtype=F64, requires_grad=True)
    pos = torch.zeros(2, 50, dtype=torch.bool)
    loss = _call(name, s, pos)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    # one empty group next to a non-empty one: the empty one gets no update, 'mean' ignores it
    pos[1, :3] = True
    s.grad = None
    per_group = _call(name, s, pos, reduction="none")
    assert per_group[0].item() == 0.0
    loss = _call(name, s, pos)
    loss.backward()
    assert torch.equal(s.grad[0], torch.zeros(50, dtype=F64))
    torch.testing.assert_close(loss, per_group[1], **TOL)


@pytest.mark.parametrize("name", ["ap", "alrp", "rs"])
def test_chunked_equals_unchunked(name):
    s, pos, _, _ = make_case(3, n=300, p=15)
    s = torch.stack([s, s.flip(0)])
    pos = torch.stack([pos, pos.flip(0)])
    a, ga = value_and_grad(lambda x, p: _call(name, x, p), s, pos)
    b, gb = value_and_grad(lambda x, p: _call(name, x, p, max_chunk_bytes=1), s, pos)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["ap", "alrp", "rs"])
def test_groups_match_separate_calls(name):
    """(G, N) input == G separate calls; 'mean' over groups with positives; grad_out per group."""
    cases = [make_case(k, n=120, p=6 + 3 * k) for k in range(3)]
    s = torch.stack([c[0] for c in cases])
    pos = torch.stack([c[1] for c in cases])
    gout = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    vals, grad = value_and_grad(lambda x, p: _call(name, x, p, reduction="none"), s, pos, grad_out=gout)
    for g in range(3):
        v, gg = value_and_grad(lambda x, p: _call(name, x, p), s[g], pos[g])
        torch.testing.assert_close(vals[g], v, **TOL)
        torch.testing.assert_close(grad[g], gg * gout[g], **TOL)
    mean = _call(name, s, pos)
    torch.testing.assert_close(mean, vals.mean(), **TOL)
    torch.testing.assert_close(_call(name, s, pos, reduction="sum"), vals.sum(), **TOL)


def test_alrp_grouped_loc_weights():
    """Per-group weights are each group's own weights, times 1/(groups with positives) for 'mean'."""
    cases = [make_case(k, n=120, p=6 + 3 * k) for k in range(3)]
    s = torch.stack([c[0] for c in cases])
    pos = torch.stack([c[1] for c in cases])
    e_loc = torch.cat([c[3] for c in cases])
    for mode in ("sorted", "smooth"):
        _, w = alrp_loss(s, pos, e_loc, loc_mode=mode)
        _, w_none = alrp_loss(s, pos, e_loc, loc_mode=mode, reduction="none")
        singles = torch.cat([alrp_loss(c[0], c[1], c[3], loc_mode=mode)[1] for c in cases])
        torch.testing.assert_close(w, singles / 3, **TOL)
        torch.testing.assert_close(w_none, singles, **TOL)
        torch.testing.assert_close(alrp_loc_weights(s, pos, mode=mode), w, **TOL)


@pytest.mark.parametrize("name", ["ap", "alrp", "rs"])
def test_binary_search_path_matches_reference(name, monkeypatch):
    """The bucketing used on CUDA (torch.searchsorted) gives the same losses and updates on CPU."""
    original = ranking._bucket_index
    monkeypatch.setattr(ranking, "_bucket_index", lambda b, n, s: original(b, n, s, force_search=True))
    s, pos, y, e_loc = make_case(11)
    x = s.clone().requires_grad_(True)
    if name == "ap":
        ref_loss, ref_grad = ref_ap(s, pos, 1.0)
        loss = ap_loss(x, pos)
    elif name == "alrp":
        ref_loss, ref_grad, _ = ref_alrp(s, pos, e_loc, 1.0)
        loss = alrp_loss(x, pos, e_loc)[0]
    else:
        ref_loss, ref_grad = ref_rs(s, pos, y, 0.5)
        loss = rs_loss(x, pos, y)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(x.grad, ref_grad, **TOL)


def test_per_image_vs_per_batch_hand_example():
    """Three positives in two images, delta = 1 (every difference is a multiple of 1, so H is 0, 1/2 or 1
    and several pairs sit exactly on a breakpoint: 1 - 0 = +delta, 1 - 2 = -delta, 2 - 3 = -delta).

    Image A: positives a1 = 3, a2 = 0; negative nA = 1.   Image B: positive b1 = 2; negatives nB = 5, -10.
    H(x) = 0 for x <= -1, 1/2 at 0, 1 for x >= 1.

    Per image (AP Loss):
      A: a1: rank+ = 1 + H(0-3) = 1, N_FP = H(1-3) = 0 -> prec 1.
         a2: rank+ = 1 + H(3-0) = 2, N_FP = H(1-0) = 1 -> prec 2/3.
         interpolation (increasing score): a2 -> 2/3, a1 -> max(2/3, 1) = 1.  L_A = 1 - (1 + 2/3)/2 = 1/6.
         update (Z = 2): a2: -(1/3)/2 = -1/6, nA: +(1/3) * H/N_FP / 2 = +1/6, a1: 0.
      B: b1: rank+ = 1, N_FP = H(5-2) + H(-10-2) = 1 -> prec 1/2, L_B = 1/2; b1: -1/2, nB: +1/2.
      mean over images: L = (1/6 + 1/2)/2 = 1/3; updates halved: a2 -1/12, nA 1/12, b1 -1/4, nB 1/4.
    Per batch (one group, Z = 3; -10 is below min positive - delta = -1: pruned):
      a1 (3): rank+ = 1 + H(0-3) + H(2-3) = 1, N_FP = H(1-3) + H(5-3) = 1 -> rank 2, prec 1/2
      a2 (0): rank+ = 1 + 1 + 1 = 3,          N_FP = H(1-0) + H(5-0) = 2 -> rank 5, prec 3/5
      b1 (2): rank+ = 1 + H(3-2) + H(0-2) = 2, N_FP = H(1-2) + H(5-2) = 1 -> rank 3, prec 2/3
      interpolation: a2 -> 3/5, b1 -> 2/3, a1 -> max(2/3, 1/2) = 2/3.
      L = 1 - (3/5 + 2/3 + 2/3)/3 = 16/45.
      errors: a2 2/5, b1 1/3, a1 1/3 -> positive updates -2/15, -1/9, -1/9.
      nA (1) is above a2 only: (2/5) * 1/2 / 3 = 1/15.
      nB (5) is above all: [(2/5)/2 + (1/3)/1 + (1/3)/1] / 3 = 13/45.   Sum: (-6-5-5+3+13)/45 = 0.
    """
    #                  a1   a2   nA | b1   nB   n(-10)
    s = torch.tensor([[3.0, 0.0, 1.0], [2.0, 5.0, -10.0]], dtype=F64)
    pos = torch.tensor([[True, True, False], [True, False, False]])
    loss, grad = value_and_grad(ap_loss, s, pos)
    torch.testing.assert_close(loss, torch.tensor(1 / 3, dtype=F64), rtol=0, atol=1e-12)
    exp = torch.tensor([[0.0, -1 / 12, 1 / 12], [-1 / 4, 1 / 4, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, exp, rtol=0, atol=1e-12)
    per_image = ap_loss(s, pos, reduction="none")
    torch.testing.assert_close(per_image, torch.tensor([1 / 6, 1 / 2], dtype=F64), rtol=0, atol=1e-12)

    loss, grad = value_and_grad(ap_loss, s.reshape(1, -1), pos.reshape(1, -1))
    torch.testing.assert_close(loss, torch.tensor(16 / 45, dtype=F64), rtol=0, atol=1e-12)
    exp = torch.tensor([[-1 / 9, -2 / 15, 1 / 15, -1 / 9, 13 / 45, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, exp, rtol=0, atol=1e-12)
    # delta = 0.5 changes nothing here (all differences are >= 1 in magnitude) except on the breakpoints
    flat = ap_loss(s.reshape(-1), pos.reshape(-1), 0.5)
    torch.testing.assert_close(flat, loss.detach(), rtol=0, atol=1e-12)
    # the loop reference agrees
    ref_loss, ref_grad = ref_ap(s.reshape(-1), pos.reshape(-1), 1.0)
    torch.testing.assert_close(ref_loss, loss.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref_grad, grad.reshape(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("where", ["negative", "positive", "second group"])
@pytest.mark.parametrize("loss", [ap_loss, rs_loss, alrp_loss])
def test_nan_logit_is_a_clear_error(loss, where):
    """A NaN logit is reported with its count and position, not as an indexing failure of the CPU grid."""
    s, pos, y, e_loc = make_case(4)
    s, pos = s.clone(), pos.clone()
    if where == "second group":  # two groups: the NaN in the second
        s, pos = torch.stack([s, s.flip(0)]), torch.stack([pos, pos.flip(0)])
        y, e_loc = torch.cat([y, y]), torch.cat([e_loc, e_loc])
        index = s.shape[1] + int((~pos[1]).nonzero()[3])
    else:
        index = int((pos if where == "positive" else ~pos).nonzero()[3])
    s.view(-1)[index] = math.nan
    extra = () if loss is ap_loss else (y,) if loss is rs_loss else (e_loc,)
    expected = rf"1 of {s.numel()} logits are NaN \(the first at flat index {index}\)"
    with pytest.raises(ValueError, match=expected):
        loss(s, pos, *extra)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 1.0])
def test_flat_positions_equal_nonzero(density):
    """The CPU (NumPy) search for the positives returns torch.nonzero's int64 indices, in its order."""
    mask = torch.rand(5000, generator=torch.Generator().manual_seed(3)) < density
    got = ranking._flat_positions(mask)
    assert got.dtype == torch.int64
    torch.testing.assert_close(got, mask.nonzero().view(-1), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_grid_bucketing_equals_searchsorted(seed):
    """The CPU grid lookup of the bucket index is exact: ties, logits on breakpoints, padded/empty groups."""
    g = torch.Generator().manual_seed(seed)
    groups, p = 4, 9
    sp = torch.round(torch.randn(groups, p, generator=g, dtype=F64) * 8) / 4
    sp[:, 1] = sp[:, 0]
    bp = torch.cat([sp - 1.0, sp + 1.0], 1)
    nfin = torch.tensor([2 * p, 2 * p - 4, 2, 0])
    bp[torch.arange(2 * p).unsqueeze(0) >= nfin.unsqueeze(1)] = math.inf
    bps = torch.sort(bp, 1).values
    s = torch.randn(groups, 500, generator=g, dtype=F64) * 3
    s[:, : 2 * p] = torch.where(torch.isfinite(bps), bps, 0.0)  # exactly on breakpoints
    s[:, 2 * p : 4 * p] = torch.nextafter(s[:, : 2 * p], torch.tensor(-math.inf, dtype=F64))  # just below
    check_bucket_index(bps, nfin, s)
    check_bucket_index(bps[:2, : 2 * p - 4].contiguous(), None, s[:2].contiguous())  # no padding
    one, s_one = bps[:1].contiguous(), s[:1].contiguous()  # one group (its grid uses Python scalars)
    check_bucket_index(one, None, s_one)
    # float32: breakpoints and logits rounded alike, logits one float32 step either side of a breakpoint
    one32 = one.float()
    s32 = s_one.float()
    s32[:, 2 * p : 4 * p] = torch.nextafter(one32, torch.tensor(-math.inf))
    s32[:, 4 * p : 6 * p] = torch.nextafter(one32, torch.tensor(math.inf))
    check_bucket_index(one32, None, s32)
    many = bps.clone()
    many[0, :12] = many[0, 0]  # > 8 breakpoints in one cell: falls back to the binary search
    check_bucket_index(torch.sort(many, 1).values, nfin, s)


def check_bucket_index(bps, nfin, s):
    key, stride = ranking._bucket_index(bps, nfin, s)
    ref = torch.searchsorted(bps, s, right=True)
    assert stride >= bps.shape[1] + 1
    offsets = torch.arange(bps.shape[0]).unsqueeze(1) * stride
    torch.testing.assert_close(key.long(), ref + offsets, rtol=0, atol=0)
    key2, stride2 = ranking._bucket_index(bps, nfin, s, force_search=True)
    torch.testing.assert_close(key2.long(), ref + torch.arange(bps.shape[0]).unsqueeze(1) * stride2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    s, pos, y, _ = make_case(5)
    x = s.to(dtype)
    ref_loss, ref_grad = ref_rs(x.to(F64), pos, y, 0.5)  # same rounded logits, float64 reference
    xx = x.clone().requires_grad_(True)
    loss = rs_loss(xx, pos, y.float())
    loss.backward()
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert xx.grad.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=1e-6)  # computed in float64 inside
    torch.testing.assert_close(xx.grad.double(), ref_grad, rtol=0, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("name", ["ap", "alrp", "rs"])
def test_cuda_matches_cpu(name):
    s, pos, _, _ = make_case(2)
    a, ga = value_and_grad(lambda x, p: _call(name, x, p), s, pos)
    b, gb = value_and_grad(lambda x, p: _call(name, x, p), s.cuda(), pos.cuda())
    torch.testing.assert_close(b.cpu(), a, **TOL)
    torch.testing.assert_close(gb.cpu(), ga, **TOL)


def test_input_errors_name_the_file():
    s = torch.randn(10)
    with pytest.raises(ValueError, match="ranking.py:alrp_loss: loc_error"):
        alrp_loss(s, s > 0, torch.zeros(int((s > 0).sum()) + 1))
    with pytest.raises(TypeError, match="ranking.py:ap_loss: pos_mask"):
        ap_loss(s, (s > 0).float())
    with pytest.raises(ValueError, match="reduction"):
        ap_loss(s, s > 0, reduction="avg")
    with pytest.raises(ValueError, match="ranking.py:rs_loss: delta"):
        rs_loss(s, s > 0, torch.zeros(int((s > 0).sum())), delta=0.0)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def test_self_balance_rule_and_state_dict():
    sb = SelfBalance(period=3)
    assert sb.weight == 50.0
    values = [(0.4, 0.2), (0.6, 0.3), (0.5, 0.1)]
    for k, (c, l) in enumerate(values):
        sb.update(torch.tensor(c), l)
        assert sb.step() == (k == 2)
        if k < 2:
            assert sb.weight == 50.0
    mean_c, mean_l = 0.5, 0.2
    assert math.isclose(sb.weight, (mean_l + mean_c) / mean_l, rel_tol=1e-6)  # 3.5 (float32 input)
    # a partial window survives a state_dict round trip and continues identically
    sb.update(1.0, 0.5)
    state = sb.state_dict()
    sb2 = SelfBalance(init=1.0, period=99)
    sb2.load_state_dict(state)
    assert sb2.weight == sb.weight and sb2.period == 3 and sb2.count == 1
    for obj in (sb, sb2):
        obj.update(1.0, 0.5)
        obj.update(0.4, 0.2)
        assert obj.step()
    assert sb.weight == sb2.weight
    assert math.isclose(sb.weight, (0.4 + 0.8) / 0.4, rel_tol=1e-12)
    # a zero localisation mean keeps the previous weight
    sb3 = SelfBalance(period=1)
    sb3.update(0.3, 0.0)
    assert sb3.step() and sb3.weight == 50.0


def test_rs_box_weights_and_balance():
    logits = torch.tensor([[0.0, 2.0, -1.0], [-3.0, -2.0, -4.0]])
    w = rs_box_weights(logits)
    top = torch.sigmoid(torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(w, top / top.sum())
    assert not w.requires_grad
    box = torch.tensor(0.25, requires_grad=True)
    out = balance_by_value(box * 2, torch.tensor(0.1))
    assert math.isclose(out.item(), 0.1, rel_tol=1e-6)
    out.backward()
    assert math.isclose(box.grad.item(), 2 * 0.1 / 0.5, rel_tol=1e-6)
    zero = balance_by_value(torch.tensor(0.0, requires_grad=True), torch.tensor(1.0))
    assert zero.item() == 0.0
