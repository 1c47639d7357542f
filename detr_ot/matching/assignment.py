"""The one object between matchers and losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    """A (possibly soft) assignment of queries to ground truths, padded over the batch.

    ``plan``: B x Q x (M+1); column 0 is the background ("no object"), column ``j+1`` the j-th ground truth of
    the image. Rows sum to 1. Ground-truth column j sums to its supply k_j (1 for one-to-one matching, k or
    OTA's dynamic k for one-to-many, see :mod:`detr_ot.matching.supply`; approximately for an unconverged or
    unbalanced plan) and the background column takes the rest. Padded ground-truth columns hold zeros.
    ``gt_mask``: B x M, True for real ground truths. ``hard``: every row is one-hot.
    The criterion only reads this object; whether ``plan`` carries a gradient is the matcher's business.
    """

    plan: torch.Tensor
    gt_mask: torch.Tensor
    hard: bool

    @property
    def to_gt(self) -> torch.Tensor:
        """B x Q x M: the mass each query sends to each ground truth."""
        return self.plan[..., 1:]

    @property
    def to_background(self) -> torch.Tensor:
        """B x Q: the mass each query sends to the background."""
        return self.plan[..., 0]

    def matched_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, query, gt) index tensors of the matched pairs; for a soft plan each query goes to its
        largest column (ground truths only)."""
        if self.hard:
            b, q, g = (self.to_gt > 0.5).nonzero(as_tuple=True)
            return b, q, g
        best = self.plan.detach().argmax(-1)
        b, q = (best > 0).nonzero(as_tuple=True)
        return b, q, best[b, q] - 1
