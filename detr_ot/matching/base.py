"""Matcher interface and registry."""

from __future__ import annotations

import torch
from torch import nn

from detr_ot.matching.assignment import Assignment
from detr_ot.matching.pairwise import CostWeights, PairwiseTerms
from detr_ot.registry import Registry

MATCHERS: Registry[Matcher] = Registry("matcher")


class Matcher(nn.Module):
    """Turns the pairwise terms of one decoder layer into an :class:`Assignment`.

    A new matcher is one file: subclass this, decorate with ``@MATCHERS.register("name", options=Options)``
    (``Options`` a dataclass of its own config keys, set as ``matcher.<name>.<key>``), and import the module in
    ``detr_ot/matching/__init__.py``.
    """

    def __init__(self, weights: CostWeights, options: object | None = None) -> None:
        super().__init__()
        self.weights = weights
        self.options = options
        self.epoch = 0
        self.num_epochs = 1

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the engine at the start of every epoch (for schedules such as epsilon annealing)."""
        self.epoch, self.num_epochs = epoch, num_epochs

    def forward(self, terms: PairwiseTerms) -> Assignment:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def empty_like(terms: PairwiseTerms) -> torch.Tensor:
        b, q, m = terms.shape
        plan = torch.zeros(b, q, m + 1, device=terms.l1.device, dtype=terms.l1.dtype)
        plan[..., 0] = 1
        return plan
