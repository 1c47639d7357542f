"""Matchers: pairwise terms -> cost -> Assignment. Importing this package registers every matcher."""

from detr_ot.matching import (
    gu,  # noqa: F401  (registers "gu")
    hungarian,  # noqa: F401  (registers "hungarian")
    sinkhorn,  # noqa: F401  (registers "sinkhorn")
    supply,  # noqa: F401  (registers "one_to_many")
)
from detr_ot.matching.assignment import Assignment
from detr_ot.matching.base import MATCHERS, Matcher
from detr_ot.matching.pairwise import (
    CostWeights,
    NonFiniteCostError,
    PaddedTargets,
    PairwiseTerms,
    compute_pairwise_terms,
    matching_cost,
)

__all__ = [
    "MATCHERS",
    "Assignment",
    "CostWeights",
    "Matcher",
    "NonFiniteCostError",
    "PaddedTargets",
    "PairwiseTerms",
    "compute_pairwise_terms",
    "matching_cost",
]
