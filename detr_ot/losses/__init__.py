"""Losses: the set criterion and the classification losses (registry ``CLASSIFICATION_LOSSES``)."""

from detr_ot.losses import ranking_cls  # noqa: F401  (registers ap, alrp, rs)
from detr_ot.losses.classification import CLASSIFICATION_LOSSES, ClassificationLoss, ClassificationResult

__all__ = ["CLASSIFICATION_LOSSES", "ClassificationLoss", "ClassificationResult"]
