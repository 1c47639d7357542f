"""Ranking-based classification losses with error-driven updates: AP, aLRP and RS Loss.

Sources:

* AP Loss: Chen, Li, Lin et al., "Towards Accurate One-Stage Object Detection with AP-Loss", CVPR 2019, and
  the journal version Chen, Lin, Li et al., "AP-Loss for Accurate One-Stage Object Detection", TPAMI 2020:
  the primary terms ``L_ij``, the perceptron-style error-driven update
  ``dL/ds_k = (1/|P|) sum_j (L_jk - L_kj)``, the smoothed (piecewise linear) step and the interpolated AP of
  their training details.
* aLRP Loss: Oksuz, Cam, Akbas, Kalkan, "A Ranking-based, Balanced Loss Function Unifying Classification and
  Localisation in Object Detection", NeurIPS 2020 (``l_LRP(i)``, its classification/localisation split,
  the ranking-based update, self-balance) and its public code.
* RS Loss: Oksuz, Cam, Akbas, Kalkan, "Rank & Sort Loss for Object Detection and Instance Segmentation",
  ICCV 2021: the ranking and sorting errors with their targets, and the update written as the paper's
  Identity Update (its gradients for negatives and for positives).

Common notation (one *ranking group*): logits ``s``, positives ``P`` (given by a mask, independent of any
quality target), negatives ``N`` (all other logits), ``x_ij = s_j - s_i`` and the smoothed step
``H(x) = clamp(x / (2 delta) + 1/2, 0, 1)`` (a tie counts 1/2). ``N_FP(i) = sum_{j in N} H(x_ij)``.
Every loss is an autograd Function whose backward is the *error-driven update* (not autograd through
``H``): each positive ``i`` has an error that is pushed back onto the logits that cause it, and the update
of a group sums to zero over its logits. Updates are divided by ``Z = |P|`` of the group.

Algorithm (exact, no ``P x N`` matrix, ``O(N log P + P^2)``). ``H(s_j - s_i)`` is piecewise linear in ``s_j``
with breakpoints ``s_i - delta`` and ``s_i + delta``. The ``2P`` breakpoints of a group are sorted and every
logit is put in its bucket between consecutive breakpoints (``torch.searchsorted`` on CUDA; an exact grid
lookup on CPU, where binary search is slow, see :func:`_bucket_index`). Per-bucket negative counts and logit
sums (``bincount``, float64) and their prefix sums give every ``N_FP(i)`` in ``O(P)``; every negative's update
is ``A_k + B_k * s_j`` inside its bucket ``k``, with ``A, B`` built from a difference array over the buckets
and applied with two gathers per logit. Bucket 0 holds exactly the negatives below ``min_i s_i - delta``:
``A_0 = B_0 = 0``, which is the papers' exact pruning (the positives are parked there too, and their update is
written afterwards). The positive-positive terms are ``P x P`` (float64), computed in row chunks whose
intermediates stay within ``max_chunk_bytes``. Per-logit work is done in ``promote(dtype, float32)``
(fp16/bf16 logits are cast up), per-positive work and bucket sums in float64; losses are returned in
``promote(dtype, float32)`` and the update in the logits' dtype. One host sync per call for one group, two for
several (the numbers of positives fix the shapes), plus one on CPU for the grid. At DETR scale on CPU a call
is dominated by the fixed cost of its ~100 small tensor ops, so the code avoids ops rather than flops where it
can (see ``tools/bench_ranking.py`` for the figures against the per-positive loop of the reference design).

Ranking groups: every loss takes ``logits`` of shape ``(N,)`` (one group) or ``(G, N)`` (``G`` groups,
e.g. ``pred_logits.flatten(1)`` for per-image grouping, ``pred_logits.reshape(1, -1)`` for per-batch
grouping); the groups are processed together without a Python loop over groups. ``reduction`` combines the
per-group losses: ``"mean"`` (default) averages over the groups that have at least one positive, ``"sum"``
adds them, ``"none"`` returns ``(G,)``. A group without positives has loss 0 and update 0 (and stays in the
autograd graph).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SelfBalance",
    "alrp_loc_weights",
    "alrp_loss",
    "ap_loss",
    "balance_by_value",
    "rs_box_weights",
    "rs_loss",
    "rs_top_scores",
]

DEFAULT_CHUNK_BYTES = 256 * 2**20
_F64 = torch.float64
_REDUCTIONS = ("mean", "sum", "none")
_HERE = "detr_ot/losses/ranking.py"


# ----------------------------------------------------------------------------------------------------------
# shared machinery
# ----------------------------------------------------------------------------------------------------------
def _smooth_step(x: Tensor, delta: float) -> Tensor:
    """``H(x) = clamp(x / (2 delta) + 1/2, 0, 1)``: the smoothed step of AP Loss (Chen et al., CVPR 2019)."""
    return (x / (2.0 * delta) + 0.5).clamp_(0.0, 1.0)


@dataclass
class _Layout:
    """Groups of a call: detached logits, masks, and the positives gathered into a padded ``(G, Pmax)``."""

    x: Tensor  # (G, N) detached logits in the work dtype promote(dtype, float32): the update's dtype
    total: int  # P, positives of all groups
    flat_pos: Tensor  # (P,) index of each positive into x.view(-1), in pos_mask.nonzero() order (row-major)
    flat_slot: Tensor | None  # (P,) group * Pmax + index inside the group: into a flat (G, Pmax); None if full
    valid: Tensor  # (G, Pmax) bool, real positive slots
    sp: Tensor  # (G, Pmax) float64 positive logits (0 on padding)
    npos: Tensor  # (G,) float64 number of positives
    pmax: int
    nonempty: int  # groups with at least one positive
    squeeze: bool  # input was 1-D
    full: bool  # every group has Pmax positives (always for one group): no padding to mask

    def pad(self, values: Tensor) -> Tensor:
        """``(P,)`` per-positive values in nonzero order -> ``(G, Pmax)`` float64, 0 on padding."""
        values = values.detach().to(device=self.sp.device, dtype=_F64)
        if self.full:
            return values.view(self.sp.shape)
        return self.sp.new_zeros(self.sp.numel()).index_copy_(0, self.flat_slot, values).view(self.sp.shape)

    def unpad(self, values: Tensor) -> Tensor:
        """``(G, Pmax)`` -> ``(P,)`` in nonzero order (index_select: advanced indexing is slow on CPU)."""
        flat = values.reshape(-1)
        return flat if self.full else flat.index_select(0, self.flat_slot)


def _flat_positions(mask: Tensor) -> Tensor:
    """``mask.nonzero()`` of a 1-D bool mask as int64 ``(P,)``; on CPU through NumPy's ``flatnonzero``, which
    is faster than ``torch.nonzero`` there."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy())).long()
    return mask.nonzero().view(-1)


def _layout(fn: str, logits: Tensor, pos_mask: Tensor, delta: float) -> _Layout:
    if not delta > 0:
        raise ValueError(f"{_HERE}:{fn}: delta must be > 0, got {delta}")
    if not torch.is_floating_point(logits):
        raise TypeError(f"{_HERE}:{fn}: logits must be floating point, got {logits.dtype}")
    if logits.dim() not in (1, 2):
        raise ValueError(f"{_HERE}:{fn}: logits must be (N,) or (G, N), got {tuple(logits.shape)}")
    if pos_mask.shape != logits.shape:
        raise ValueError(f"{_HERE}:{fn}: pos_mask {tuple(pos_mask.shape)} must match logits {tuple(logits.shape)}")
    if pos_mask.dtype != torch.bool:
        raise TypeError(f"{_HERE}:{fn}: pos_mask must be a bool tensor, got {pos_mask.dtype}")
    squeeze = logits.dim() == 1
    x = logits.detach()
    work = torch.promote_types(logits.dtype, torch.float32)
    x = x.to(work)  # no copy for float32/float64 logits
    if squeeze:
        x = x.unsqueeze(0)
    g, n = x.shape
    flat_pos = _flat_positions(pos_mask.to(logits.device).reshape(-1))  # row-major: grouped by group
    total = flat_pos.numel()  # host sync (nonzero; with G > 1 also Pmax): the shapes depend on it
    values = x.view(-1).index_select(0, flat_pos).to(_F64)
    if g == 1:
        valid = torch.ones(1, total, dtype=torch.bool, device=x.device)
        npos = torch.full((1,), float(total), dtype=_F64, device=x.device)
        return _Layout(
            x, total, flat_pos, None, valid, values.unsqueeze(0), npos, total, int(total > 0), squeeze, True
        )
    gi = torch.div(flat_pos, n, rounding_mode="floor")
    counts = torch.bincount(gi, minlength=g)
    pmax, nonempty = torch.stack([counts.max(), (counts > 0).sum()]).tolist() if total else (0, 0)  # one sync
    first = counts.cumsum(0) - counts  # index of each group's first positive
    slot = torch.arange(total, device=x.device) - first.index_select(0, gi)
    flat_slot = gi * pmax + slot
    valid = torch.zeros(g * pmax, dtype=torch.bool, device=x.device).index_fill_(0, flat_slot, True)
    sp = torch.zeros(g * pmax, dtype=_F64, device=x.device).index_copy_(0, flat_slot, values)
    full = total == g * pmax
    return _Layout(
        x, total, flat_pos, None if full else flat_slot, valid.view(g, pmax), sp.view(g, pmax),
        counts.to(_F64), pmax, nonempty, squeeze, full,
    )


def _check_per_positive(fn: str, name: str, values: Tensor, lay: _Layout) -> None:
    if values.dim() != 1 or values.numel() != lay.total:
        raise ValueError(
            f"{_HERE}:{fn}: {name} must be (P,) with P = pos_mask.sum() = {lay.total} "
            f"(positives in pos_mask.nonzero() order), got {tuple(values.shape)}"
        )


_GRID_CELLS_PER_BREAKPOINT = 16
_GRID_MAX_PER_CELL = 8


def _bucket_index(bps: Tensor, nfinite: Tensor | None, s: Tensor, force_search: bool = False) -> tuple[Tensor, int]:
    """Bucket of every logit: ``key = g * stride + #{m : bps[g, m] <= s[g, j]}`` (int32) and ``stride``.

    Rows of ``bps`` are ascending with their first ``nfinite[g]`` entries finite (``None``: all finite), the
    rest ``+inf``; ``stride >= 2P + 1`` (buckets beyond ``2P`` stay empty).
    On CUDA this is ``torch.searchsorted``. On CPU a binary search over random logits is dominated by branch
    mispredictions, so each group gets a uniform grid of ``M`` cells over
    ``[b_first, b_last]`` with ``cell(x) = clamp(floor((x - b_first) * M / span), 0, M - 1)``. ``cell`` is
    monotone in ``x`` (each float step is, and breakpoints and logits go through the same kernels), so
    ``b <= s`` implies ``cell(b) <= cell(s)`` and ``cell(b) > cell(s)`` implies ``b > s``: the count is the
    number of breakpoints in earlier cells (a table lookup) plus exact comparisons with the ``T`` breakpoints
    from the start of ``s``'s cell on (``T`` = most breakpoints in one cell; those of later cells compare
    False). ``M = max(16 * 2P, N / (4G))`` cells per group (a table of about ``N / 4`` entries), so that
    distinct breakpoints usually get their own cell (``T = 1``). Exact; falls back to the binary search when
    more than 8 breakpoints share a cell.
    """
    if not force_search and s.device.type == "cpu":
        try:
            found = _grid_index(bps, nfinite, s)
        except (IndexError, RuntimeError):  # a NaN has no cell; checked only then (no cost on good logits)
            nan = torch.isnan(s).view(-1)
            if not bool(nan.any()):
                raise
            raise ValueError(
                f"{_HERE}: {int(nan.sum())} of {nan.numel()} logits are NaN (the first at flat index "
                f"{int(nan.nonzero()[0, 0])}): the ranking losses need numbers"
            ) from None
        if found is not None:
            return found
    g, b = bps.shape
    key = torch.searchsorted(bps, s, right=True, out_int32=True)
    if g > 1:
        key += (torch.arange(g, device=s.device, dtype=torch.int32) * (b + 1)).unsqueeze(1)
    return key, b + 1


def _grid_index(bps: Tensor, nfinite: Tensor | None, s: Tensor) -> tuple[Tensor, int] | None:
    """The CPU grid lookup of :func:`_bucket_index`; ``None`` when more than 8 breakpoints share a cell."""
    g, b = bps.shape
    n = s.shape[1]
    i32 = torch.int32
    m = max(_GRID_CELLS_PER_BREAKPOINT * b, n // (4 * g))  # cells per group
    first: Tensor | float
    scale: Tensor | float
    if g == 1:  # Python scalars (one read of two values instead of five tensor ops); both the breakpoints and
        # the logits go through the same float ops with the same scalars, so cell() stays monotone and shared
        lo, hi = bps[0, [0, -1]].tolist()
        first, scale = lo, (m / (hi - lo) if hi > lo else 0.0)  # span 0: every logit in cell 0
    elif nfinite is None:  # every breakpoint finite: no padding to mask
        first, span = bps[:, :1], bps[:, -1:] - bps[:, :1]
        scale = (m / span).nan_to_num_(0.0, 0.0, 0.0)
    else:
        finite = torch.arange(b, device=s.device).unsqueeze(0) < nfinite.unsqueeze(1)
        zero = bps.new_zeros(())
        first = torch.where(nfinite > 0, bps[:, 0], zero).unsqueeze(1)
        last = bps.gather(1, (nfinite - 1).clamp_min(0).unsqueeze(1))
        span = torch.where(nfinite.unsqueeze(1) > 0, last - first, zero)
        scale = (m / span).nan_to_num_(0.0, 0.0, 0.0)  # span 0 (no breakpoint): every logit in cell 0

    def cell(x: Tensor) -> Tensor:  # the same float operations for breakpoints and logits
        y = x - first
        return y.mul_(scale).clamp_(0, m - 1).to(i32)

    if nfinite is None:
        bcell = cell(bps)
    else:
        bcell = torch.where(finite, cell(torch.where(finite, bps, first)), m)  # padding: cell m, never hit
    # shifted[g, c + 1] = breakpoints of group g in cell c, so that its running sum counts those before c
    bcell += 1
    if g > 1:
        bcell += (torch.arange(g, device=s.device, dtype=i32) * (m + 2)).unsqueeze(1)
    shifted = torch.bincount(bcell.view(-1), minlength=g * (m + 2)).view(g, m + 2)
    t_max = int(shifted[:, 1 : m + 1].max())  # host sync: the number of comparison passes
    if t_max > _GRID_MAX_PER_CELL:
        return None
    stride = b + max(t_max, 1)  # rows of the padded breakpoints; also the bucket stride of the groups
    # before[g, c] = g * stride + number of breakpoints of group g in cells < c
    before = shifted[:, : m + 1].cumsum(1, dtype=i32)
    if g > 1:
        before += (torch.arange(g, device=s.device, dtype=i32) * stride).unsqueeze(1)
    cs = cell(s)
    if g > 1:
        cs += (torch.arange(g, device=s.device, dtype=i32) * (m + 1)).unsqueeze(1)
    key = before.view(-1).index_select(0, cs.view(-1))  # first breakpoint of s's cell
    del cs
    if t_max:
        padded = torch.cat([bps, bps.new_full((g, stride - b), math.inf)], 1).view(-1)  # key + t in its row
        flat_s = s.reshape(-1)
        # T (usually 1) passes, not a loop over positives; all comparisons first, then the counts
        hits = [padded.index_select(0, key + t if t else key) <= flat_s for t in range(t_max)]
        for hit in hits:
            key += hit
    return key.view(g, n), stride


@dataclass
class _Buckets:
    """Negatives bucketed by the sorted breakpoints ``s_i -+ delta`` of their group."""

    key: Tensor  # (G, N) flat bucket id g * K + k; positives go to bucket 0 (H = 0 there for every i)
    bp: Tensor  # (G, 2 Pmax) float64 breakpoints [s_i - delta | s_i + delta] (finite on padding)
    where: Tensor  # (G, 2 Pmax) their sorted positions [lo_i | up_i]
    nfp: Tensor  # (G, Pmax) N_FP(i) = sum_{j in N} H(s_j - s_i), 0 on padding
    nbuckets: int  # K >= 2 Pmax + 1, the bucket stride of the groups (buckets beyond 2 Pmax are empty)


def _bucket_negatives(lay: _Layout, delta: float) -> _Buckets:
    """Sort the ``2P`` breakpoints, bucket every logit, and compute ``N_FP(i)`` in ``O(N log P + P log P)``.

    Bucket ``k`` is ``[b_{k-1}, b_k)`` (``b_{-1} = -inf``, ``b_{2P} = +inf``). For positive ``i`` with
    breakpoints at sorted positions ``lo_i < up_i``, ``H(s_j - s_i)`` is 0 on buckets ``<= lo_i``, linear
    ``(s_j - s_i) / (2 delta) + 1/2`` on buckets ``lo_i + 1 .. up_i`` and 1 above, so
    ``N_FP(i) = n_above + (sum_lin s_j - s_i n_lin) / (2 delta) + n_lin / 2`` from bucket prefix sums.
    A logit exactly on a breakpoint may fall in either adjacent bucket: ``H`` is continuous, so both agree.
    Bucket 0 holds the pruned negatives (and, parked in group 0's, the positives): it is left out of the sums.
    """
    g, n = lay.x.shape
    p = lay.pmax
    bp = torch.cat([lay.sp - delta, lay.sp + delta], 1)  # finite (padding: -+delta, with coefficient 0)
    # padding sorts last and is never <= a logit
    bp_sort = bp if lay.full else bp.masked_fill(~lay.valid.repeat(1, 2), math.inf)
    bps = torch.sort(bp_sort, dim=1).values
    # sorted position of each breakpoint (the first of equal ones: buckets between equal breakpoints are
    # empty, so any of them is as good)
    where = torch.searchsorted(bps, bp_sort)

    # bucket of each logit, in [0, 2P], in the work dtype (float32 logits: breakpoints rounded to float32,
    # which only moves logits within an ulp of a breakpoint, where H is continuous)
    key, k = _bucket_index(bps.to(lay.x.dtype), None if lay.full else 2 * lay.npos.long(), lay.x)
    flat = key.view(-1)
    flat.index_fill_(0, lay.flat_pos, 0)  # positives: bucket 0 of group 0, left out below (O(P), no pass)
    cnt = torch.bincount(flat, minlength=g * k)
    ssum = torch.bincount(flat, weights=lay.x.reshape(-1).to(_F64), minlength=g * k)  # float64 sums
    stats = torch.stack([cnt.to(_F64), ssum], 1).view(g, k, 2)  # [count, sum of logits] per bucket
    stats[:, 0] = 0.0
    cum = stats.cumsum(1)  # cum[:, m]: totals over buckets 1 .. m
    at = cum.gather(1, where.unsqueeze(2).expand(g, 2 * p, 2))  # at lo_i and at up_i
    n_lin, s_lin = (at[:, p:] - at[:, :p]).unbind(2)
    n_above = cum[:, -1, 0:1] - at[:, p:, 0]
    # sum over the linear buckets of (s_j - s_i) / (2 delta) + 1/2 = (s_j - (s_i - delta)) / (2 delta)
    nfp = (s_lin - bp[:, :p] * n_lin).div_(2.0 * delta).add_(n_above).clamp_min_(0.0)
    if not lay.full:
        nfp.masked_fill_(~lay.valid, 0.0)
    return _Buckets(key, bp, where, nfp, k)


def _negative_update(lay: _Layout, bk: _Buckets, coef: Tensor, delta: float) -> Tensor:
    """``u_j = sum_i coef_i H(s_j - s_i)`` for every negative ``j`` (positives get 0), as ``(G, N)``.

    Inside bucket ``k`` the sum is affine, ``A_k + B_k s_j``; ``[A, B]`` are cumulative sums of a
    difference array (positive ``i`` enters the linear part ``coef_i ((s_j - s_i) / (2 delta) + 1/2)`` at
    bucket ``lo_i + 1`` and saturates to ``coef_i`` at ``up_i + 1``), then one gather of each per logit.
    """
    g, p = coef.shape
    k = bk.nbuckets
    if not lay.full:
        coef = coef.masked_fill(~lay.valid, 0.0)
    slope = coef / (2.0 * delta)
    # [A, B] steps, with b_lo, b_up = s_i -+ delta: at lo_i + 1 positive i enters its linear part
    # slope_i (s_j - b_lo) (A -= slope_i b_lo, B += slope_i); at up_i + 1 it saturates at
    # coef_i = slope_i (b_up - b_lo) (A += slope_i b_up, B -= slope_i)
    signed = torch.cat([-slope, slope], 1)  # (G, 2P), matching the [lo | up] breakpoints
    steps = torch.stack([signed * bk.bp, signed.neg()], 2)
    diff = coef.new_zeros(g, k, 2)  # up_i + 1 <= 2P < K: every step lands inside its group
    diff.scatter_add_(1, (bk.where + 1).unsqueeze(2).expand(g, 2 * p, 2), steps)
    # (G*K, 2) table of [A, B] in the work dtype (float32 for float32 logits), as is the update; bucket 0 of
    # every group is 0 (the steps start at lo_i + 1 >= 1): the positives, parked in bucket 0 of group 0, get 0
    table = diff.cumsum(1).view(-1, 2).t().to(lay.x.dtype, copy=True)
    key = bk.key.view(-1)
    # index_select, not table[1][key]: advanced indexing is slow. Separate multiply and add (not addcmul, whose
    # vectorised body may fuse them): the rounding of a logit's update must not depend on its position in
    # the tensor, so that a group gives the same update alone or batched with others. >= 0: terms are >= 0.
    u = table[1].index_select(0, key).mul_(lay.x.reshape(-1)).add_(table[0].index_select(0, key))
    return u.clamp_min_(0.0).view(lay.x.shape)


def _assemble_update(lay: _Layout, u: Tensor, g_pos: Tensor) -> Tensor:
    """Full ``(G, N)`` update: negatives from ``u`` (filled in place), positives from the padded ``g_pos``."""
    u.view(-1).index_copy_(0, lay.flat_pos, lay.unpad(g_pos).to(u.dtype))
    return u


def _row_chunks(lay: _Layout, max_chunk_bytes: int, n_live: int = 6) -> Iterator[slice]:
    """Row blocks of the ``P x P`` work: about ``n_live`` float64 ``(G, rows, Pmax)`` fit the budget."""
    g, p = lay.valid.shape
    per_row = max(1, g * p * 8 * n_live)
    step = max(1, int(max_chunk_bytes) // per_row)
    for start in range(0, p, step):
        yield slice(start, min(p, start + step))


def _pair_diff(lay: _Layout, rows: slice) -> Tensor:
    """``D[g, r, k] = s_k - s_i`` for ``i = rows[r]`` (float64)."""
    return lay.sp.unsqueeze(1) - lay.sp[:, rows].unsqueeze(2)


def _pair_step(lay: _Layout, rows: slice, delta: float, diff: Tensor | None = None) -> Tensor:
    """``H[g, r, k] = H(s_k - s_i)`` for ``i = rows[r]``, 0 for padded ``k``; ``1/2`` on the diagonal."""
    h = _smooth_step(_pair_diff(lay, rows) if diff is None else diff, delta)
    return h if lay.full else h.mul_(lay.valid.unsqueeze(1))


def _inv_count(lay: _Layout) -> Tensor | float:
    """``1 / |P|`` of each group: a float for one group, else ``(G, 1)`` (1 for groups without positives)."""
    if lay.x.shape[0] == 1:
        return 1.0 / max(lay.total, 1)
    return lay.npos.clamp_min(1.0).reciprocal_().unsqueeze(1)


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_HERE}:{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _group_factor(lay: _Layout, reduction: str) -> float | None:
    """Factor of the group sum for ``reduction`` (empty groups have value 0 and no positives).

    ``"mean"``: 1 / number of groups with positives; ``"sum"``: 1; ``"none"``: ``None`` (no reduction).
    """
    if reduction == "none":
        return None
    if reduction == "sum" or lay.x.shape[0] == 1:
        return 1.0
    return 1.0 / max(lay.nonempty, 1)


def _reduce(values: Tensor, factor: float) -> Tensor:
    """``factor * sum(values)`` of the per-group values (no multiply for a unit factor)."""
    total = values.sum()
    return total if factor == 1.0 else total * factor


class _ErrorDriven(torch.autograd.Function):
    """Returns precomputed per-group loss values, reduced; backward returns the precomputed error-driven update.

    ``factor``: ``None`` returns the ``(G,)`` values; a float returns ``factor * sum(values)`` (the reduction
    happens here, so that the graph has one node per loss call).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, values: Tensor, update: Tensor, factor: float | None
    ) -> Tensor:
        ctx.save_for_backward(update)
        ctx.in_dtype = logits.dtype
        ctx.in_shape = logits.shape
        ctx.factor = factor
        return values.clone() if factor is None else _reduce(values, factor)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (update,) = ctx.saved_tensors
        if ctx.factor is None:
            grad = update * grad_out.to(update.dtype).unsqueeze(-1)
        else:
            grad = update * (grad_out if ctx.factor == 1.0 else grad_out * ctx.factor).to(update.dtype)
        return grad.to(ctx.in_dtype).reshape(ctx.in_shape), None, None, None


def _finish(fn: str, logits: Tensor, lay: _Layout, values: Tensor, update: Tensor | None, reduction: str) -> Tensor:
    """Wrap group values ``(G,)`` and update ``(G, N)`` into the autograd graph and apply ``reduction``."""
    _check_reduction(fn, reduction)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    factor = _group_factor(lay, reduction)
    values = values.to(out_dtype)
    if update is not None:
        src = logits.unsqueeze(0) if lay.squeeze else logits
        out = _ErrorDriven.apply(src, values, update.to(out_dtype), factor)
        return out.squeeze(0) if factor is None and lay.squeeze else out
    if factor is None:
        return values.squeeze(0) if lay.squeeze else values
    return _reduce(values, factor)


def _wants_grad(logits: Tensor) -> bool:
    return torch.is_grad_enabled() and logits.requires_grad


def _running_min_by_score(lay: _Layout, bk: _Buckets, x: Tensor) -> Tensor:
    """``min_{k in P, s_k <= s_i} x_k`` per group: running minimum in order of increasing score.

    The sorted position ``lo_i`` of ``s_i - delta`` among the breakpoints orders the positives by score
    (ties share a position), so this is a prefix minimum over positions: no sort. Tied positives share the
    same value (they see the same logits). Padding sits at positions after every real positive.
    """
    g, p = x.shape
    lo = bk.where[:, :p]
    best = x.new_full((g, 2 * p), math.inf).scatter_reduce_(1, lo, x, "amin")
    out = best.cummin(1).values.gather(1, lo)
    return out if lay.full else out.masked_fill_(~lay.valid, 0.0)


# ----------------------------------------------------------------------------------------------------------
# AP Loss
# ----------------------------------------------------------------------------------------------------------
def ap_loss(
    logits: Tensor,
    pos_mask: Tensor,
    delta: float = 1.0,
    *,
    reduction: str = "mean",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """AP Loss with its error-driven update (Chen et al., CVPR 2019; TPAMI 2020).

    ``rank+(i) = 1 + sum_{k in P, k != i} H(x_ik)``, ``rank(i) = rank+(i) + N_FP(i)``,
    ``prec(i) = rank+(i) / rank(i)``; interpolated precision ``prec^(i) = max_{k in P, s_k <= s_i} prec(k)``
    (running maximum in order of increasing score, as in the AP-Loss training code); loss
    ``1 - mean_i prec^(i)``. Primary terms ``L_ij = (1 - prec^(i)) H(x_ij) / N_FP(i)`` (with the interpolated
    error; for ``prec^ = prec`` these are the paper's ``H(x_ij) / rank(i)``); error-driven update
    ``dL/ds_i = -(1 - prec^(i)) / |P|`` for positives and ``dL/ds_j = (1/|P|) sum_i L_ij`` for negatives.
    There are no positive-positive primary terms.

    Args:
        logits: ``(N,)`` or ``(G, N)`` logits of one or ``G`` ranking groups (any float dtype).
        pos_mask: bool, same shape, True on positives.
        delta: half-width of the smoothed step.
        reduction: ``"mean"`` over groups with positives, ``"sum"`` or ``"none"`` (``(G,)``).
        max_chunk_bytes: budget of the ``P x P`` intermediates.
    """
    lay = _layout("ap_loss", logits, pos_mask, delta)
    update = None
    if lay.pmax == 0:
        values = lay.sp.new_zeros(lay.x.shape[0])
        if _wants_grad(logits):
            update = torch.zeros_like(lay.x)
        return _finish("ap_loss", logits, lay, values, update, reduction)
    bk = _bucket_negatives(lay, delta)
    # rank+(i) = 1 + sum_{k != i} H(x_ik) = 1/2 + sum_k H(x_ik), as H(x_ii) = H(0) = 1/2 exactly
    chunks = [_pair_step(lay, rows, delta).sum(-1) for rows in _row_chunks(lay, max_chunk_bytes)]
    rank_pos = chunks[0] if len(chunks) == 1 else torch.cat(chunks, 1)
    rank = rank_pos.add_(0.5 + bk.nfp) if lay.full else (rank_pos + 0.5).masked_fill_(~lay.valid, 1.0) + bk.nfp
    # 1 - prec^(i) = min_{s_k <= s_i} N_FP(k) / rank(k) (rank >= 1/2): a fraction, accurate for tiny N_FP;
    # divided by |P| here
    err_z = _running_min_by_score(lay, bk, bk.nfp / rank).mul_(_inv_count(lay))
    values = err_z.sum(1)
    if _wants_grad(logits):
        coef = err_z / bk.nfp.clamp_min(1e-300)  # L_ij = err(i) H(x_ij) / N_FP(i); err(i) = 0 if N_FP(i) = 0
        update = _assemble_update(lay, _negative_update(lay, bk, coef, delta), err_z.neg_())
    return _finish("ap_loss", logits, lay, values, update, reduction)


# ----------------------------------------------------------------------------------------------------------
# aLRP Loss
# ----------------------------------------------------------------------------------------------------------
def _alrp_pairs(
    lay: _Layout, bk: _Buckets, delta: float, loc_error: Tensor | None, mode: str, max_chunk_bytes: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``rank(i)``, ``sum_{k != i} H(x_ik) E_loc(k)`` and the raw localisation weights (``P x P`` part).

    The diagonal ``k = i`` is not a term: it holds ``H(0) = 1/2`` (both steps) and is subtracted per row.
    """
    rank_pos = torch.empty_like(lay.sp)
    h_e = torch.empty_like(lay.sp) if loc_error is not None else None
    w = torch.zeros_like(lay.sp)
    for rows in _row_chunks(lay, max_chunk_bytes):
        diff = _pair_diff(lay, rows)
        h = _pair_step(lay, rows, delta, diff)
        rank_rows = h.sum(-1).add_(0.5)  # 1 + sum_{k != i} H(x_ik)
        rank_pos[:, rows] = rank_rows
        if h_e is not None:
            h_e[:, rows] = (h * loc_error.unsqueeze(1)).sum(-1) - 0.5 * loc_error[:, rows]
        inv_rank = 1.0 / (rank_rows + bk.nfp[:, rows])
        if not lay.full:
            inv_rank.masked_fill_(~lay.valid[:, rows], 0.0)
        if mode == "sorted":  # hard step [s_k > s_i], ties 1/2
            h = torch.heaviside(diff, diff.new_full((), 0.5))
            if not lay.full:
                h.mul_(lay.valid.unsqueeze(1))
        # column sums: w_k += sum_{i in rows, i != k} H(x_ik) / rank(i)
        w += (h * inv_rank.unsqueeze(2)).sum(1)
        w[:, rows] -= 0.5 * inv_rank
    rank = rank_pos + bk.nfp
    w = w + 1.0 / rank
    if not lay.full:
        w.masked_fill_(~lay.valid, 0.0)
    return rank, h_e, w


def _check_mode(fn: str, mode: str) -> None:
    if mode not in ("sorted", "smooth"):
        raise ValueError(f"{_HERE}:{fn}: mode must be 'sorted' or 'smooth', got {mode!r}")


def alrp_loss(
    logits: Tensor,
    pos_mask: Tensor,
    loc_error: Tensor,
    delta: float = 1.0,
    *,
    eps: float = 1e-5,
    loc_mode: str = "sorted",
    reduction: str = "mean",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Tensor, Tensor]:
    """aLRP Loss, classification part with its error-driven update, plus the localisation weights.

    Oksuz et al., NeurIPS 2020 (aLRP Loss): ``l_LRP(i) = [N_FP(i) + E_loc(i) + sum_{k in P, k != i} H(x_ik) E_loc(k)]
    / rank(i)`` with ``rank(i) = 1 + sum_{k != i} H(x_ik) + N_FP(i)``, split into
    ``L_cls = mean_i N_FP(i) / rank(i)`` (returned value) and ``L_loc`` (see :func:`alrp_loc_weights`).
    Update: the error of positive ``i``, ``e(i) = [N_FP(i) + sum_{k != i} H(x_ik) E_loc(k)] / rank(i)``
    (``E_loc`` detached), is pushed onto the negatives in proportion to ``H(x_ij) / N_FP(i)``:
    ``dL/ds_i = -e(i) / |P|``, ``dL/ds_j = (1/|P|) sum_i e(i) H(x_ij) / N_FP(i)``.
    Choice (as the reference code): a positive with ``N_FP(i) <= eps`` has no negative to push its error
    onto and gets no update.

    Args:
        logits, pos_mask, delta, reduction, max_chunk_bytes: as :func:`ap_loss`.
        loc_error: ``(P,)`` localisation errors ``E_loc`` of the positives in ``pos_mask.nonzero()`` order
            (row-major for ``(G, N)``), expected in ``[0, 1]``-ish units; the reference uses
            ``E_loc = (1 - GIoU) / (2 (1 - tau))`` with ``tau = 0.5``, i.e. ``1 - GIoU``. Treated as a
            constant (no gradient flows into it from here).
        eps: ``N_FP`` threshold of the update.
        loc_mode: how :func:`alrp_loc_weights` ranks positives among themselves (``"sorted"`` default).

    Returns:
        ``(cls_loss, loc_weights)``: ``cls_loss`` reduced like ``reduction``; ``loc_weights`` ``(P,)``
        detached, in ``pos_mask.nonzero()`` order, so that ``L_loc = (loc_weights * box_loss).sum()`` is the
        aLRP localisation component with the same group reduction (per-group ``1/|P|`` and the
        ``reduction`` factor included; for ``"none"`` only ``1/|P|``).
    """
    fn = "alrp_loss"
    _check_mode(fn, loc_mode)
    lay = _layout(fn, logits, pos_mask, delta)
    _check_per_positive(fn, "loc_error", loc_error, lay)
    update = None
    if lay.pmax == 0:
        values = lay.sp.new_zeros(lay.x.shape[0])
        if _wants_grad(logits):
            update = torch.zeros_like(lay.x)
        weights = loc_error.detach().new_zeros(0)
        return _finish(fn, logits, lay, values, update, reduction), weights
    bk = _bucket_negatives(lay, delta)
    e_loc = lay.pad(loc_error)
    rank, h_e, w = _alrp_pairs(lay, bk, delta, e_loc, loc_mode, max_chunk_bytes)
    inv_z = _inv_count(lay)
    values = (bk.nfp / rank).mul_(inv_z).sum(1)  # N_FP is 0 on padding
    if _wants_grad(logits):
        active = bk.nfp > eps  # padding slots never reach the update (masked / dropped by unpad)
        err_z = torch.where(active, (bk.nfp + h_e) / rank, 0.0).mul_(inv_z)
        coef = err_z / bk.nfp.clamp_min(1e-300)  # 0 where inactive
        update = _assemble_update(lay, _negative_update(lay, bk, coef, delta), err_z.neg_())
    loss = _finish(fn, logits, lay, values, update, reduction)
    return loss, _loc_weights_out(lay, w.mul_(inv_z), reduction, loc_error.dtype)


def _loc_weights_out(lay: _Layout, w: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    _check_reduction("alrp_loc_weights", reduction)
    factor = _group_factor(lay, reduction)
    if factor is not None and factor != 1.0:
        w = w * factor
    return lay.unpad(w).to(torch.promote_types(dtype, torch.float32))


def alrp_loc_weights(
    logits: Tensor,
    pos_mask: Tensor,
    delta: float = 1.0,
    *,
    mode: str = "sorted",
    reduction: str = "mean",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Per-positive weights ``w`` with ``L_loc = sum_i w_i * box_loss_i`` (aLRP localisation component).

    Oksuz et al., NeurIPS 2020: ``L_loc = (1/|P|) sum_i [E_loc(i) + sum_{k != i} H'(x_ik) E_loc(k)] / rank(i)``
    with ``rank(i)`` and the pairwise relation detached, so the box losses are weighted through the ranking:
    ``w_k = (1/|P|) [1 / rank(k) + sum_{i != k} H'(s_k - s_i) / rank(i)]``. ``rank(i)`` is the smoothed
    rank of the classification part (``H`` with ``delta``). ``H'`` (the choice left open by the papers):

    * ``mode="sorted"`` (default; the reference code): the hard step ``[s_k > s_i]`` (ties 1/2), i.e. sort
      positives by score, cumulative sums of the box losses divided by the detached rank, mean;
    * ``mode="smooth"``: the smoothed ``H`` of the paper's formula, so the weights sum to ``1 - L_cls``.

    Returns ``(P,)`` detached weights in ``pos_mask.nonzero()`` order, including the per-group ``1/|P|`` and
    the ``reduction`` factor.
    """
    fn = "alrp_loc_weights"
    _check_mode(fn, mode)
    lay = _layout(fn, logits, pos_mask, delta)
    if lay.pmax == 0:
        return lay.x.new_zeros(0)
    bk = _bucket_negatives(lay, delta)
    _, _, w = _alrp_pairs(lay, bk, delta, None, mode, max_chunk_bytes)
    return _loc_weights_out(lay, w.mul_(_inv_count(lay)), reduction, logits.dtype)


class SelfBalance:
    """aLRP self-balance weight ``w_SB`` of ``L = L_cls + w_SB * L_loc`` (Oksuz et al., NeurIPS 2020, self-balance).

    Starts at ``init`` (50, as the paper). Call :meth:`update` every iteration with the (unweighted) values
    of ``L_cls`` and ``L_loc`` and then :meth:`step`; every ``period`` updates ``step`` sets
    ``w_SB = (mean L_loc + mean L_cls) / mean L_loc`` over the window and starts a new window. The means are
    all-reduced across processes when ``torch.distributed`` is initialised (the reference keeps them per
    process), so every process holds the same weight. Values are accumulated as float64 tensors on their own
    device (no host sync per iteration). Save :meth:`state_dict` in checkpoints.
    """

    def __init__(self, init: float = 50.0, period: int = 1000) -> None:
        if period < 1:
            raise ValueError(f"{_HERE}:SelfBalance: period must be >= 1, got {period}")
        self.weight = float(init)
        self.period = int(period)
        self.count = 0
        self._sums: Tensor | None = None  # [sum L_cls, sum L_loc]

    def update(self, cls_value: Tensor | float, loc_value: Tensor | float) -> None:
        """Accumulate one iteration's ``L_cls`` and ``L_loc`` (detached)."""
        ref = cls_value if isinstance(cls_value, Tensor) else loc_value
        device = ref.device if isinstance(ref, Tensor) else torch.device("cpu")
        pair = torch.stack(
            [torch.as_tensor(v, dtype=_F64, device=device).detach().reshape(()) for v in (cls_value, loc_value)]
        )
        self._sums = pair if self._sums is None else self._sums + pair.to(self._sums.device)
        self.count += 1

    def step(self) -> bool:
        """Re-estimate ``w_SB`` if ``period`` updates were accumulated; returns whether it did."""
        if self.count < self.period:
            return False
        sums = self._sums if self._sums is not None else torch.zeros(2, dtype=_F64)
        stats = torch.cat([sums, sums.new_tensor([float(self.count)])])
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and stats.device.type != "cuda":
                stats = stats.cuda()
            dist.all_reduce(stats)  # sums and counts of all processes: global means
        mean_cls, mean_loc = (stats[:2] / stats[2]).tolist()
        if mean_loc > 0.0 and math.isfinite(mean_cls) and math.isfinite(mean_loc):
            self.weight = (mean_loc + mean_cls) / mean_loc
        self.count = 0
        self._sums = None
        return True

    def synchronize(self) -> None:
        """Make every process hold the same state (a collective; call it on all processes, e.g. before a
        checkpoint): the open window's sums become their mean over processes. The next :meth:`step` sums
        them over processes again, so its ``w_SB`` is unchanged, and a run resumed from rank 0's state
        continues exactly as an uninterrupted one."""
        if not (dist.is_available() and dist.is_initialized()) or self.count == 0 or self._sums is None:
            return
        sums = self._sums
        if dist.get_backend() == "nccl" and sums.device.type != "cuda":
            sums = sums.cuda()
        sums = sums.clone()
        dist.all_reduce(sums)
        self._sums = (sums / dist.get_world_size()).to(self._sums.device)

    def state_dict(self) -> dict:
        sums = [0.0, 0.0] if self._sums is None else self._sums.tolist()
        return {
            "weight": self.weight,
            "period": self.period,
            "count": self.count,
            "sum_cls": sums[0],
            "sum_loc": sums[1],
        }

    def load_state_dict(self, state: dict) -> None:
        self.weight = float(state["weight"])
        self.period = int(state["period"])
        self.count = int(state["count"])
        self._sums = torch.tensor([state["sum_cls"], state["sum_loc"]], dtype=_F64) if self.count else None


# ----------------------------------------------------------------------------------------------------------
# RS Loss
# ----------------------------------------------------------------------------------------------------------
def rs_loss(
    logits: Tensor,
    pos_mask: Tensor,
    ious: Tensor,
    delta: float = 0.5,
    *,
    eps: float = 1e-10,
    reduction: str = "mean",
    return_parts: bool = False,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Rank & Sort Loss with its error-driven update (Oksuz et al., ICCV 2021).

    ``rank+(i) = sum_{k in P} H(x_ik)`` (``k = i`` included, so it counts 1/2 with the smoothed step, as the
    RS paper/code), ``rank(i) = rank+(i) + N_FP(i)``. Ranking error ``l_R(i) = N_FP(i) / rank(i)`` (target 0);
    sorting error ``l_S(i) = sum_{k in P} H(x_ik) (1 - y_k) / rank+(i)`` with target
    ``l_S*(i) = sum_k H(x_ik) [y_k >= y_i] (1 - y_k) / sum_k H(x_ik) [y_k >= y_i]``. Loss
    ``(1/|P|) sum_i [l_R(i) + l_S(i) - l_S*(i)]`` (the RS Loss minus its target). Update (the paper's Identity
    Update, its gradients for negatives and positives):
    ranking: ``-l_R(i)`` on positive ``i`` and ``+l_R(i) H(x_ij) / N_FP(i)`` on negatives (if
    ``N_FP(i) > eps``); sorting: ``-(l_S(i) - l_S*(i))`` on ``i`` and
    ``+(l_S(i) - l_S*(i)) H(x_ik) [y_k < y_i] / sum_m H(x_im) [y_m < y_i]`` on positives ``k`` (if that sum
    is ``> eps``); all divided by ``|P|``.

    Args:
        logits, pos_mask, reduction, max_chunk_bytes: as :func:`ap_loss`; a positive with IoU 0 stays a
            positive (the mask, not the IoU, decides).
        ious: ``(P,)`` quality targets ``y`` in ``[0, 1]`` (IoU of each positive's predicted box with its
            ground truth, detached), in ``pos_mask.nonzero()`` order.
        delta: half-width of the smoothed step (0.5 in the RS paper).
        eps: thresholds of the two updates (reference code value).
        return_parts: also return the detached ranking and sorting parts (same reduction).
    """
    fn = "rs_loss"
    lay = _layout(fn, logits, pos_mask, delta)
    _check_per_positive(fn, "ious", ious, lay)
    g = lay.x.shape[0]
    update = None
    if lay.pmax == 0:
        zeros = lay.sp.new_zeros(g)
        if _wants_grad(logits):
            update = torch.zeros_like(lay.x)
        loss = _finish(fn, logits, lay, zeros, update, reduction)
        if return_parts:
            part = _finish(fn, logits.detach(), lay, zeros, None, reduction)
            return loss, part, part.clone()
        return loss
    bk = _bucket_negatives(lay, delta)
    y = lay.pad(ious)
    one_minus_y = 1.0 - y  # padding columns of H are 0
    rank_pos = lay.sp.new_zeros(lay.sp.shape)
    sort_err = lay.sp.new_zeros(lay.sp.shape)
    g_sort = lay.sp.new_zeros(lay.sp.shape)  # sorting update, before the 1/|P|
    for rows in _row_chunks(lay, max_chunk_bytes, n_live=8):
        h = _pair_step(lay, rows, delta)  # H(s_k - s_i), self included (1/2)
        rp = h.sum(-1)
        rank_pos[:, rows] = rp
        l_s = (h * one_minus_y.unsqueeze(1)).sum(-1) / rp.clamp_min(1e-300)
        ht = h * (y.unsqueeze(1) >= y[:, rows].unsqueeze(2))
        l_s_star = (ht * one_minus_y.unsqueeze(1)).sum(-1) / ht.sum(-1).clamp_min(1e-300)
        err = l_s - l_s_star
        if not lay.full:
            err.masked_fill_(~lay.valid[:, rows], 0.0)
        sort_err[:, rows] = err
        missorted = h.sub_(ht)  # H(x_ik) [y_k < y_i]
        denom = missorted.sum(-1)
        active = denom > eps
        err_act = torch.where(active, err, 0.0)
        g_sort[:, rows] -= err_act
        g_sort += (missorted * (err_act / denom.clamp_min(1e-300)).unsqueeze(2)).sum(1)
    rank = rank_pos + bk.nfp
    l_r = bk.nfp / rank.clamp_min(1e-300)  # N_FP is 0 on padding
    inv_z = _inv_count(lay)
    rank_part = (l_r * inv_z).sum(1)
    sort_part = (sort_err * inv_z).sum(1)
    if _wants_grad(logits):
        active = bk.nfp > eps  # padding slots never reach the update (masked / dropped by unpad)
        l_r_act = torch.where(active, l_r, 0.0)
        coef = torch.where(active, rank.clamp_min(1e-300).reciprocal(), 0.0).mul_(inv_z)  # l_R / N_FP
        update = _assemble_update(lay, _negative_update(lay, bk, coef, delta), (g_sort - l_r_act).mul_(inv_z))
    loss = _finish(fn, logits, lay, rank_part + sort_part, update, reduction)
    if return_parts:
        return (
            loss,
            _finish(fn, logits.detach(), lay, rank_part, None, reduction),
            _finish(fn, logits.detach(), lay, sort_part, None, reduction),
        )
    return loss


def rs_top_scores(query_logits: Tensor) -> Tensor:
    """Detached top score ``sigmoid(max_c s_ic)`` (float32 at least) of each positive's query; ``(P, K)`` or
    already-reduced ``(P,)`` logits."""
    top = query_logits.detach()
    if top.dim() == 2:
        top = top.max(dim=-1).values
    return top.float().sigmoid()


def rs_box_weights(query_logits: Tensor, eps: float = 1e-10) -> Tensor:
    """Detached RS box-loss weights: each positive's top score, normalised to sum 1 (RS paper and code).

    ``query_logits``: ``(P, K)`` class logits of the matched queries (or ``(P,)`` already-reduced logits).
    ``w_i = sigmoid(max_c s_ic) / sum_k sigmoid(max_c s_kc)``; if the sum is ``<= eps`` the raw scores are
    returned (the reference code's guard: divide by 1). ``L_box = sum_i w_i box_loss_i``.
    """
    top = rs_top_scores(query_logits)
    total = top.sum()
    return top / torch.where(total > eps, total, torch.ones_like(total))


def balance_by_value(box_loss: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """``box_loss * reference / box_loss`` with both values detached (RS value-based balancing).

    Gives the box loss the value of ``reference`` (e.g. ``L_R + L_S``) while keeping its own gradient
    direction. Guard: if ``box_loss <= eps`` the factor is 0 (a vanishing box loss carries no signal).
    """
    b = box_loss.detach()
    factor = torch.where(b > eps, reference.detach().to(b.dtype) / b.clamp_min(eps), torch.zeros_like(b))
    return box_loss * factor
