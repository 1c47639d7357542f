"""COCO-style evaluation."""

from detr_ot.evaluation.coco_evaluator import BACKENDS, CocoEvaluator
from detr_ot.evaluation.ground_truth import EvalGroundTruth, EvalGroundTruthError, prepare_ground_truth

__all__ = ["BACKENDS", "CocoEvaluator", "EvalGroundTruth", "EvalGroundTruthError", "prepare_ground_truth"]
