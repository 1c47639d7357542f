"""COCO-style evaluation."""

from detr_ot.evaluation.coco_evaluator import BACKENDS, CocoEvaluator

__all__ = ["BACKENDS", "CocoEvaluator"]
