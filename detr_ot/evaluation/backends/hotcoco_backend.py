"""hotcoco: a Rust re-implementation of COCO evaluation with pycocotools' numbers.

It takes the detections as one ``(N, 7)`` array (its ``load_res`` fills ``id``, ``area`` = w*h and
``iscrowd`` as pycocotools' ``loadRes`` does), so no Python dict is built per detection. Its per-image state is
a ``StreamingEval``: every rank matches its own images and sends the state as bytes; rank 0 merges the states
(no matching redone) and accumulates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from detr_ot.evaluation.backends.base import EVAL_BACKENDS, EvalBackend


@EVAL_BACKENDS.register("hotcoco")
class HotcocoBackend(EvalBackend):
    name = "hotcoco"

    def __init__(self) -> None:
        try:
            import hotcoco
        except ImportError as err:
            raise ImportError(
                "evaluation backend 'hotcoco' needs the hotcoco package: "
                "pip install hotcoco (or set train.eval_backend=pycocotools)"
            ) from err
        self._hotcoco = hotcoco

    def load_gt(self, dataset: dict[str, Any]) -> Any:
        return self._hotcoco.COCO(dataset)  # copies the dataset into its own structures

    def load_results(self, gt: Any, detections: np.ndarray) -> Any:
        return gt.load_res(detections)

    def make_eval(self, gt: Any, detections: np.ndarray, img_ids: Sequence[int]) -> Any:
        coco_eval = self._hotcoco.COCOeval(gt, self.load_results(gt, detections), iouType="bbox")
        coco_eval.params.imgIds = list(img_ids)
        return coco_eval

    def per_image_state(self, gt: Any, detections: np.ndarray, img_ids: list[int]) -> bytes:
        stream = self._hotcoco.StreamingEval(gt.loadCats(gt.getCatIds()), iou_type="bbox")
        stream.update(gt.loadImgs(img_ids), gt.loadAnns(gt.getAnnIds(imgIds=img_ids)), detections)
        return stream.to_bytes()

    def merge(self, gt: Any, parts: Sequence[tuple[list[int], Any]], all_ids: list[int]) -> Any:
        states = (self._hotcoco.StreamingEval.from_bytes(state) for _, state in parts)
        coco_eval = self._hotcoco.StreamingEval.merge(states).finalize()
        if list(coco_eval.params.imgIds) != all_ids:
            raise RuntimeError("CocoEvaluator: the merged hotcoco states do not hold every image once")
        coco_eval.accumulate()
        return coco_eval
