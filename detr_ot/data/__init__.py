"""Data: COCO-format datasets (COCO, your own, the built-in synthetic shapes), DETR transforms, batching.

Names are imported lazily (PEP 562) so that ``python -m detr_ot.data.shapes`` runs without the package having
imported the module first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "build_dataset": "build",
    "build_loader": "build",
    "check_same_categories": "build",
    "resolve_split": "build",
    "AnnotationError": "coco",
    "CocoDetection": "coco",
    "load_coco_annotations": "coco",
    "collate_batch": "collate",
    "ensure_shapes_dataset": "shapes",
    "generate_shapes": "shapes",
    "build_transforms": "transforms",
    "Resolution": "transforms",
}

__all__ = [
    "AnnotationError",
    "CocoDetection",
    "Resolution",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "check_same_categories",
    "collate_batch",
    "ensure_shapes_dataset",
    "generate_shapes",
    "load_coco_annotations",
    "resolve_split",
]

if TYPE_CHECKING:
    from detr_ot.data.build import build_dataset, build_loader, check_same_categories, resolve_split
    from detr_ot.data.coco import AnnotationError, CocoDetection, load_coco_annotations
    from detr_ot.data.collate import collate_batch
    from detr_ot.data.shapes import ensure_shapes_dataset, generate_shapes
    from detr_ot.data.transforms import Resolution, build_transforms


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"detr_ot.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'detr_ot.data' has no attribute {name!r}")
