"""What the backends with pycocotools' Python API (pycocotools itself and faster_coco_eval) share: result
objects built from annotated records, COCOeval over chosen images, and the rank-0 merge that places every
rank's per-image records at their single-process positions before accumulating."""

from __future__ import annotations

import contextlib
import copy
import io
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from detr_ot.evaluation.backends.base import EvalBackend, result_records


class CocoApiBackend(EvalBackend):
    """A backend exposing pycocotools' ``COCO`` / ``COCOeval`` classes. Subclasses set the two classes in
    ``__init__`` (``coco_cls``, ``eval_cls``) and say how per-image records travel between ranks."""

    coco_cls: type
    eval_cls: type

    def eval_kwargs(self, separate: bool) -> dict[str, Any]:
        """Extra COCOeval constructor arguments; ``separate``: keep per-image records for a later merge."""
        return {}

    @abstractmethod
    def encode(self, coco_eval: Any) -> Any:
        """An evaluated COCOeval's per-image records, in COCOeval's (category, area, image) order, picklable."""

    @abstractmethod
    def decode(self, encoded: Any) -> list[Any]:
        """The inverse of :meth:`encode`: a list in the library's per-image layout (None for absent entries)."""

    @abstractmethod
    def set_per_image(self, coco_eval: Any, records: list[Any]) -> None:
        """Install merged per-image ``records`` in ``coco_eval`` so that ``accumulate`` reads them."""

    def load_gt(self, dataset: dict[str, Any]) -> Any:
        gt = self.coco_cls()
        gt.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt

    def load_results(self, gt: Any, detections: np.ndarray) -> Any:
        """Equivalent to ``gt.loadRes`` for boxes, without its second pass over the records; also valid for no
        detections (on which pycocotools' loadRes fails)."""
        res = self.coco_cls()
        res.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": result_records(detections, annotate=True),
        }
        with contextlib.redirect_stdout(io.StringIO()):
            res.createIndex()
        return res

    def _make_eval(self, gt: Any, detections: np.ndarray, img_ids: Sequence[int], separate: bool) -> Any:
        coco_eval = self.eval_cls(gt, self.load_results(gt, detections), iouType="bbox",
                                  **self.eval_kwargs(separate))
        coco_eval.params.imgIds = list(img_ids)
        return coco_eval

    def make_eval(self, gt: Any, detections: np.ndarray, img_ids: Sequence[int]) -> Any:
        return self._make_eval(gt, detections, img_ids, separate=False)

    def per_image_state(self, gt: Any, detections: np.ndarray, img_ids: list[int]) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = self._make_eval(gt, detections, img_ids, separate=True)
            coco_eval.evaluate()
        return self.encode(coco_eval)

    def merge(self, gt: Any, parts: Sequence[tuple[list[int], Any]], all_ids: list[int]) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = self._make_eval(gt, np.zeros((0, 7)), [], separate=True)
        p = coco_eval.params
        p.imgIds = list(all_ids)
        p.catIds = sorted(np.unique(p.catIds).tolist())
        p.maxDets = sorted(p.maxDets)
        num_ka = len(p.catIds) * len(p.areaRng)
        position = {image_id: n for n, image_id in enumerate(all_ids)}
        merged: list[Any] = [None] * (num_ka * len(all_ids))
        for ids, state in parts:
            local = np.asarray([position[i] for i in ids], dtype=np.int64)
            entries = self.decode(state)
            if len(entries) != num_ka * len(local):
                raise RuntimeError("CocoEvaluator: per-image records of a rank do not match the categories")
            target = (np.arange(num_ka)[:, None] * len(all_ids) + local[None, :]).reshape(-1)
            for t, entry in zip(target.tolist(), entries, strict=True):
                merged[t] = entry
        coco_eval._paramsEval = copy.deepcopy(p)
        self.set_per_image(coco_eval, merged)
        coco_eval.accumulate()
        return coco_eval
