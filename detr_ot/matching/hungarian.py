"""Exact one-to-one assignment (the DETR baseline), solved per image with scipy."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from detr_ot.matching.assignment import Assignment
from detr_ot.matching.base import MATCHERS, Matcher
from detr_ot.matching.pairwise import PairwiseTerms, matching_cost


def solve_hungarian(cost: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """Min-cost one-to-one assignment of every image's block, as a hard plan B x Q x (M+1) (column 0 is
    the background). Ground truths are packed first in every image (``gt_mask`` is a prefix mask).

    One device-to-host copy for the whole padded batch; scipy's ``linear_sum_assignment`` (Crouse's
    shortest augmenting path) on each image's own Q x M_b block; one host-to-device copy back.
    """
    counts = gt_mask.sum(1).tolist()
    blocks = cost.detach().to("cpu", torch.float64).numpy()
    rows_b, rows_q, cols = [], [], []
    for b, n in enumerate(counts):  # scipy solves one problem per call: the loop is over images only
        if n == 0:
            continue
        q_idx, g_idx = linear_sum_assignment(blocks[b, :, :n])
        rows_b.append(np.full(len(q_idx), b))
        rows_q.append(q_idx)
        cols.append(g_idx)
    return hard_plan(cost, rows_b, rows_q, cols)


def hard_plan(
    cost: torch.Tensor, rows_b: list[np.ndarray], rows_q: list[np.ndarray], cols: list[np.ndarray]
) -> torch.Tensor:
    """The hard plan B x Q x (M+1) of ``cost``'s shape and dtype, on its device, from per-image arrays of matched
    (image, query, ground truth) indices: a 1 at ``(b, q, g + 1)`` for every match, at column 0 (background)
    for every query left unmatched. Built on the host, copied to the device once."""
    batch, queries, m = cost.shape
    plan = torch.zeros(batch, queries, m + 1, dtype=cost.dtype)
    plan[..., 0] = 1
    if rows_b:
        bi = torch.from_numpy(np.concatenate(rows_b))
        qi = torch.from_numpy(np.concatenate(rows_q))
        gi = torch.from_numpy(np.concatenate(cols))
        plan[bi, qi, 0] = 0
        plan[bi, qi, gi + 1] = 1
    return plan.to(cost.device, non_blocking=True)


@MATCHERS.register("hungarian")
class HungarianMatcher(Matcher):
    """DETR's matcher (Carion et al., ECCV 2020): the detached cost, exact assignment, no gradient."""

    @torch.no_grad()
    def forward(self, terms: PairwiseTerms) -> Assignment:
        cost = matching_cost(terms, self.weights, detach=True)
        return Assignment(plan=solve_hungarian(cost, terms.gt_mask), gt_mask=terms.gt_mask, hard=True)
