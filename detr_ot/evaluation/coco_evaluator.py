"""COCO box evaluation (Lin et al., "Microsoft COCO", ECCV 2014; metric definitions at
https://cocodataset.org/#detection-eval): AP averaged over IoU 0.50:0.05:0.95 with 101-point interpolated
precision, plus AP50/AP75, per-area AP, and AR at 1/10/100 detections per image.

Detections are stored per image as one float64 array of rows ``[x, y, w, h, score, category_id]``; per-box
Python dicts are only built when handing them to the COCO API in :meth:`CocoEvaluator.evaluate`/``dump``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

BACKENDS = ("pycocotools", "faster_coco_eval")
NUM_STATS = 12
_COLS = 6  # x, y, w, h, score, category_id


def _backend_classes(backend: str) -> tuple[type, type]:
    """(COCO, COCOeval) classes of ``backend``."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    raise ValueError(f"CocoEvaluator: unknown backend {backend!r}; choose one of {BACKENDS}")


class CocoEvaluator:
    """Accumulates detections per image id and computes the 12 standard COCO box statistics.

    Usage: ``update({image_id: {"scores", "labels", "boxes" (xyxy, absolute pixels)}})`` per batch; in
    distributed runs every rank calls :meth:`synchronize` (a collective); then :meth:`evaluate`.
    ``labels`` are contiguous 0..K-1 and are mapped to COCO category ids through ``label_to_cat_id``.
    Every image passed to ``update`` is evaluated, including images with no detections (their ground
    truths count as misses); an image id updated more than once keeps its first detections only.
    """

    def __init__(self, coco_gt: Any, label_to_cat_id: Sequence[int], backend: str = "pycocotools") -> None:
        self._coco_cls, self._eval_cls = _backend_classes(backend)
        self.backend = backend
        self.coco_gt = coco_gt
        self.label_to_cat_id = np.asarray(list(label_to_cat_id), dtype=np.int64)
        unknown = sorted(set(self.label_to_cat_id.tolist()) - set(coco_gt.cats))
        if unknown:
            raise ValueError(
                f"CocoEvaluator: label_to_cat_id holds category ids {unknown} absent from coco_gt"
            )
        self._gt_for_backend: Any = None
        self._results: dict[int, np.ndarray] = {}
        self.coco_eval: Any = None
        self.stats: list[float] = [0.0] * NUM_STATS

    # ------------------------------------------------------------------ accumulate
    def reset(self) -> None:
        """Forget all detections (e.g. before the next evaluation epoch)."""
        self._results = {}
        self.coco_eval = None
        self.stats = [0.0] * NUM_STATS

    @property
    def img_ids(self) -> list[int]:
        """Sorted ids of every image seen by :meth:`update` (after :meth:`synchronize`: on any rank)."""
        return sorted(self._results)

    @property
    def num_detections(self) -> int:
        return int(sum(r.shape[0] for r in self._results.values()))

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add detections ``{image_id: {"scores": (n,), "labels": (n,) int, "boxes": (n,4) xyxy pixels}}``."""
        for raw_id, pred in predictions.items():
            image_id = int(raw_id)
            if image_id in self._results:
                continue  # distributed padding / repeated image: count once
            if image_id not in self.coco_gt.imgs:
                raise KeyError(
                    f"CocoEvaluator.update: image_id {image_id} is not in the ground-truth COCO file"
                )
            self._results[image_id] = self._to_rows(image_id, pred)

    def _to_rows(self, image_id: int, pred: Mapping[str, torch.Tensor]) -> np.ndarray:
        boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64).numpy()
        scores = torch.as_tensor(pred["scores"]).detach().to("cpu", torch.float64).numpy()
        labels = torch.as_tensor(pred["labels"]).detach().to("cpu", torch.int64).numpy()
        n = scores.shape[0] if scores.ndim == 1 else -1
        if boxes.shape != (n, 4) or labels.shape != (n,):
            raise ValueError(
                f"CocoEvaluator.update: image_id {image_id}: expected scores (n,), labels (n,), boxes (n,4); "
                f"got {scores.shape}, {labels.shape}, {boxes.shape}"
            )
        if n and (labels.min() < 0 or labels.max() >= len(self.label_to_cat_id)):
            raise ValueError(
                f"CocoEvaluator.update: image_id {image_id}: label outside 0..{len(self.label_to_cat_id) - 1}"
            )
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"CocoEvaluator.update: image_id {image_id}: non-finite boxes or scores")
        rows = np.empty((n, _COLS), dtype=np.float64)
        rows[:, :2] = boxes[:, :2]
        rows[:, 2:4] = boxes[:, 2:] - boxes[:, :2]  # xyxy -> xywh
        rows[:, 4] = scores
        rows[:, 5] = self.label_to_cat_id[labels]
        return rows

    def synchronize(self) -> None:
        """Gather every rank's detections onto every rank (collective: all ranks must call it) and keep one
        entry per image id (the lowest rank's), so sampler padding duplicates count once."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict[int, np.ndarray] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._results)
        merged: dict[int, np.ndarray] = {}
        for part in gathered:
            for image_id, rows in (part or {}).items():
                merged.setdefault(image_id, rows)
        self._results = merged

    # ------------------------------------------------------------------ evaluate
    def _records(self) -> list[dict[str, Any]]:
        """COCO result records ``{"image_id", "category_id", "bbox" [x,y,w,h], "score"}``, image-id order."""
        img_ids = self.img_ids
        rows = [self._results[i] for i in img_ids]
        if not rows or sum(r.shape[0] for r in rows) == 0:
            return []
        all_rows = np.concatenate(rows)
        ids = np.repeat(np.asarray(img_ids, dtype=np.int64), [r.shape[0] for r in rows]).tolist()
        bboxes = all_rows[:, :4].tolist()
        scores = all_rows[:, 4].tolist()
        cats = all_rows[:, 5].astype(np.int64).tolist()
        return [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(ids, cats, bboxes, scores, strict=True)
        ]

    def _gt(self) -> Any:
        """The ground truth as the backend's own COCO class (a private deep copy when converting, so the
        two libraries never share the annotation dicts they annotate in place)."""
        if self._gt_for_backend is None:
            if isinstance(self.coco_gt, self._coco_cls):
                self._gt_for_backend = self.coco_gt
            else:
                gt = self._coco_cls()
                gt.dataset = copy.deepcopy(self.coco_gt.dataset)
                with contextlib.redirect_stdout(io.StringIO()):
                    gt.createIndex()
                self._gt_for_backend = gt
        return self._gt_for_backend

    def _result_coco(self, coco_gt: Any, records: list[dict[str, Any]]) -> Any:
        """Result COCO object equivalent to ``coco_gt.loadRes(records)`` for boxes (area = w*h, ids from
        1, iscrowd 0), also valid for an empty ``records`` (on which pycocotools' loadRes fails)."""
        for index, rec in enumerate(records, start=1):
            w, h = rec["bbox"][2], rec["bbox"][3]
            rec.update(id=index, area=w * h, iscrowd=0)
        res = self._coco_cls()
        res.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": copy.deepcopy(coco_gt.dataset["categories"]),
            "annotations": records,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            res.createIndex()
        return res

    def evaluate(self) -> list[float]:
        """Run COCOeval (bbox) over every image seen by :meth:`update`; print the standard summary and
        return its 12 stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) as floats.

        With no detections at all the result is 12 zeros (``coco_eval`` is still run when there are
        images, so its precision array exists; with no images it stays None)."""
        img_ids = self.img_ids
        self.coco_eval = None
        self.stats = [0.0] * NUM_STATS
        if not img_ids:
            print("CocoEvaluator: no images were evaluated; returning zeros")
            return list(self.stats)
        coco_gt = self._gt()
        records = self._records()
        coco_dt = self._result_coco(coco_gt, records)
        kwargs: dict[str, Any] = {"print_function": print} if self.backend == "faster_coco_eval" else {}
        coco_eval = self._eval_cls(coco_gt, coco_dt, iouType="bbox", **kwargs)
        coco_eval.params.imgIds = img_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        self.coco_eval = coco_eval
        if not records:
            print("CocoEvaluator: no detections; returning zeros")
            return list(self.stats)
        coco_eval.summarize()
        self.stats = [float(s) for s in np.asarray(coco_eval.stats)[:NUM_STATS]]
        return list(self.stats)

    def dump(self, path: str | Path) -> None:
        """Write the detections as a COCO results JSON (list of image_id/category_id/bbox/score)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            json.dump(self._records(), f)
