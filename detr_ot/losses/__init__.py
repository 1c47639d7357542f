"""Losses: the set criterion and the classification losses (registry ``CLASSIFICATION_LOSSES``)."""

from detr_ot.losses.classification import CLASSIFICATION_LOSSES, ClassificationLoss

__all__ = ["CLASSIFICATION_LOSSES", "ClassificationLoss"]
