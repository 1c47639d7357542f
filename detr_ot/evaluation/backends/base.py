"""The interface between :class:`~detr_ot.evaluation.CocoEvaluator` and one COCO evaluation library.

A backend turns a COCO ground-truth dataset dict and an ``(N, 7)`` float64 detection array
``[image_id, x, y, w, h, score, category_id]`` (image-id order) into an accumulated COCOeval-like object whose
``summarize()`` fills the 12 standard box statistics (Lin et al., "Microsoft COCO", ECCV 2014; metric
definitions at https://cocodataset.org/#detection-eval) and whose ``eval["precision"]`` / ``eval["recall"]``
are pycocotools' arrays. It also provides the two halves of the per-image distributed strategy: a picklable
per-image state of one rank's images, and the merge of every rank's states on rank 0.

A new backend is one module in this package: a subclass of :class:`EvalBackend` decorated with
``@EVAL_BACKENDS.register("name")``, imported in ``backends/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from detr_ot.registry import Registry

NUM_STATS = 12
DET_COLS = 7  # image_id, x, y, w, h, score, category_id

class EvalBackend(ABC):
    """One COCO box-evaluation library. Constructing it imports the library (``ImportError`` with the install
    command if it is missing); the methods hold no state, so one instance serves any number of evaluations."""

    name: ClassVar[str] = ""
    #: Default distributed strategy: True spreads the per-image matching over the ranks (worth it when the
    #: matching dominates and the per-image state is cheap to send), False gathers the detections on rank 0.
    per_image_default: ClassVar[bool] = False

    @abstractmethod
    def load_gt(self, dataset: dict[str, Any]) -> Any:
        """The library's ground-truth object of a COCO ``dataset`` dict. The library may keep and annotate the
        dict it is given, so callers pass one the evaluator owns."""

    @abstractmethod
    def load_results(self, gt: Any, detections: np.ndarray) -> Any:
        """The library's result object of ``detections`` (``(N, 7)``, see the module docstring), as
        pycocotools' ``loadRes`` makes it for boxes (ids from 1, ``area`` = w*h, ``iscrowd`` 0)."""

    @abstractmethod
    def make_eval(self, gt: Any, detections: np.ndarray, img_ids: Sequence[int]) -> Any:
        """A bbox COCOeval over ``img_ids`` with ``detections``, not yet run."""

    def evaluate(self, gt: Any, detections: np.ndarray, img_ids: Sequence[int]) -> Any:
        """The COCOeval of ``detections`` over ``img_ids``, evaluated and accumulated (not summarised)."""
        coco_eval = self.make_eval(gt, detections, img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        return coco_eval

    def summarize(self, coco_eval: Any) -> list[float]:
        """Print the standard summary of an accumulated ``coco_eval``; return its 12 stats as floats."""
        coco_eval.summarize()
        return [float(s) for s in np.asarray(coco_eval.stats)[:NUM_STATS]]

    @abstractmethod
    def per_image_state(self, gt: Any, detections: np.ndarray, img_ids: list[int]) -> Any:
        """The per-image evaluation (the matching) of ``img_ids``, in a picklable form for :meth:`merge`."""

    @abstractmethod
    def merge(self, gt: Any, parts: Sequence[tuple[list[int], Any]], all_ids: list[int]) -> Any:
        """Rank 0: the accumulated COCOeval of the union of ``parts`` (``(owned image ids, state)`` per rank,
        disjoint, together ``all_ids`` in sorted order), exactly as one process evaluating ``all_ids``."""


EVAL_BACKENDS: Registry[EvalBackend] = Registry("evaluation backend")


def result_records(detections: np.ndarray, annotate: bool = False) -> list[dict[str, Any]]:
    """COCO result records ``{"image_id", "category_id", "bbox" [x,y,w,h], "score"}`` of ``detections``
    (``(N, 7)``), in row order. ``annotate``: also the fields ``loadRes`` adds to boxes (``id`` from 1,
    ``area`` = w*h, ``iscrowd`` 0), built in the same pass (half a million records: a second pass costs a
    noticeable share of a fast backend's evaluation)."""
    if detections.shape[0] == 0:
        return []
    ids = detections[:, 0].astype(np.int64).tolist()
    bboxes = detections[:, 1:5].tolist()
    scores = detections[:, 5].tolist()
    cats = detections[:, 6].astype(np.int64).tolist()
    if not annotate:
        return [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(ids, cats, bboxes, scores, strict=True)
        ]
    areas = (detections[:, 3] * detections[:, 4]).tolist()  # the same float64 product as loadRes's w * h
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s, "id": k, "area": a, "iscrowd": 0}
        for k, (i, c, b, s, a) in enumerate(zip(ids, cats, bboxes, scores, areas, strict=True), start=1)
    ]
