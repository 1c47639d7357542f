"""COCO box evaluation (Lin et al., "Microsoft COCO", ECCV 2014; metric definitions at
https://cocodataset.org/#detection-eval): AP averaged over IoU 0.50:0.05:0.95 with 101-point interpolated
precision, plus AP50/AP75, per-area AP, and AR at 1/10/100 detections per image.

Detections are stored per image as one float64 array of rows ``[x, y, w, h, score, category_id]`` and handed
to a backend as one ``(N, 7)`` array ``[image_id, x, y, w, h, score, category_id]``; per-box Python dicts are
only built by the backends with pycocotools' API, and in ``dump``.

Backends (``train.eval_backend``) are adapters in :mod:`detr_ot.evaluation.backends`: ``pycocotools`` (the
reference), ``faster_coco_eval`` (pycocotools' numbers to 1e-12 on our tests, not bit for bit) and ``hotcoco``
(the default; pycocotools' 12 numbers and precision, recall and score arrays bit for bit on our tests), both
much faster (tools/bench_eval.py measures them; figures in the README).
A backend receives a box-only copy of the ground truth, loaded when the evaluator's ground truth is prepared
(:func:`~detr_ot.evaluation.ground_truth.prepare_ground_truth`; the trainer does it at start-up), so a file a
backend rejects fails before training, naming the file and the record.

Distributed evaluation (:meth:`CocoEvaluator.evaluate_distributed`) counts every image exactly once: an image
seen by several ranks (DistributedSampler pads the last shard with repeated images) belongs to the lowest rank
that saw it. Two strategies, chosen by ``per_image``:

* per image (default for ``pycocotools``): every rank runs the per-image evaluation (matching, the expensive
  part) on the images it owns and sends the backend's per-image state to rank 0, which places the states at
  their single-process positions (hotcoco: merges its ``StreamingEval`` states) and accumulates. The
  accumulation sees exactly the records a single process would compute, so the 12 numbers are identical.
* gather (default for ``faster_coco_eval`` and ``hotcoco``): the detections (a few float64 arrays) are
  gathered on rank 0, which runs the backend's whole evaluation. faster_coco_eval's per-image records cost
  more to serialise than its whole evaluation on one rank, and hotcoco's whole evaluation is so fast that its
  per-image strategy was no faster than gathering.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from detr_ot.evaluation.backends import DET_COLS, EVAL_BACKENDS, NUM_STATS, get_backend, result_records
from detr_ot.evaluation.ground_truth import EvalGroundTruth, prepare_ground_truth

# The reference first (tools/bench_eval.py runs them in this order).
BACKENDS: tuple[str, ...] = ("pycocotools", *(n for n in EVAL_BACKENDS.names() if n != "pycocotools"))
DEFAULT_BACKEND = "hotcoco"
_COLS = DET_COLS - 1  # per-image rows: x, y, w, h, score, category_id


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming the choices if ``backend`` is unknown, ``ImportError`` with the install
    command if its package is missing."""
    get_backend(backend)


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CocoEvaluator:
    """Accumulates detections per image id and computes the 12 standard COCO box statistics.

    Usage: ``update({image_id: {"scores", "labels", "boxes" (xyxy, absolute pixels)}})`` per batch, then
    :meth:`evaluate` (this process's images) or, in distributed runs, :meth:`evaluate_distributed` on every
    rank (a collective; the union of all ranks' images, each counted once).
    ``labels`` are contiguous 0..K-1 and are mapped to COCO category ids through ``label_to_cat_id``.
    Every image passed to ``update`` is evaluated, including images with no detections (their ground
    truths count as misses); an image id updated more than once keeps its first detections only.
    After evaluation ``coco_eval`` is the backend's COCOeval object (``coco_eval.eval["precision"]``: the
    (T, R, K, A, M) precision array, per category, for plots); in distributed runs only on rank 0.

    ``coco_gt``: an :class:`EvalGroundTruth` prepared at start-up, or anything
    :func:`~detr_ot.evaluation.ground_truth.prepare_ground_truth` takes (a COCO object, a dataset dict, an
    annotation file path), prepared here (cached per object); ``source`` names the file in its messages.
    """

    def __init__(self, coco_gt: Any, label_to_cat_id: Sequence[int], backend: str = DEFAULT_BACKEND,
                 source: str | os.PathLike | None = None) -> None:
        self.ground_truth: EvalGroundTruth = prepare_ground_truth(coco_gt, backend, source)
        self._backend = self.ground_truth.backend
        self.backend = backend
        self.coco_gt = coco_gt
        self.label_to_cat_id = np.asarray(list(label_to_cat_id), dtype=np.int64)
        unknown = sorted(set(self.label_to_cat_id.tolist()) - self.ground_truth.cat_ids)
        if unknown:
            raise ValueError(
                f"CocoEvaluator: label_to_cat_id holds category ids {unknown} absent from coco_gt"
            )
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
        """Sorted ids of every image seen by :meth:`update` (after :meth:`synchronize`: on any rank; after
        :meth:`evaluate_distributed`: on rank 0)."""
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
            if image_id not in self.ground_truth.image_ids:
                raise KeyError(
                    f"CocoEvaluator.update: image_id {image_id} is not in the ground truth "
                    f"({self.ground_truth.source})"
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
        if _dist_world() == 1:
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, _pack_rows(self._results))
        merged: dict[int, np.ndarray] = {}
        for part in gathered:
            for image_id, rows in _unpack_rows(part).items():
                merged.setdefault(image_id, rows)
        self._results = merged

    # ------------------------------------------------------------------ evaluate
    def _records(self) -> list[dict[str, Any]]:
        """COCO result records ``{"image_id", "category_id", "bbox" [x,y,w,h], "score"}``, image-id order."""
        return result_records(self._det_array(self.img_ids))

    def _det_array(self, img_ids: Sequence[int]) -> np.ndarray:
        """The detections of ``img_ids`` as one ``(N, 7)`` float64 array
        ``[image_id, x, y, w, h, score, category_id]``, image-id order."""
        rows = [self._results[i] for i in img_ids]
        if not rows:
            return np.zeros((0, DET_COLS))
        ids = np.repeat(np.asarray(img_ids, dtype=np.float64), [r.shape[0] for r in rows])
        return np.concatenate([ids[:, None], np.concatenate(rows)], axis=1)

    def _gt(self) -> Any:
        """The ground truth as the backend's own object."""
        return self.ground_truth.native

    def _summarize(self, coco_eval: Any, num_detections: int) -> list[float]:
        self.coco_eval = coco_eval
        self.stats = [0.0] * NUM_STATS
        if num_detections == 0:
            print("CocoEvaluator: no detections; returning zeros")
            return list(self.stats)
        self.stats = self._backend.summarize(coco_eval)
        return list(self.stats)

    def evaluate(self) -> list[float]:
        """Run COCOeval (bbox) over every image this process saw in :meth:`update`; print the standard summary
        and return its 12 stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) as floats.

        With no detections at all the result is 12 zeros (``coco_eval`` is still run when there are
        images, so its precision array exists; with no images it stays None)."""
        img_ids = self.img_ids
        self.coco_eval = None
        self.stats = [0.0] * NUM_STATS
        if not img_ids:
            print("CocoEvaluator: no images were evaluated; returning zeros")
            return list(self.stats)
        detections = self._det_array(img_ids)
        coco_eval = self._backend.evaluate(self._gt(), detections, img_ids)
        return self._summarize(coco_eval, detections.shape[0])

    def evaluate_distributed(self, per_image: bool | None = None, verbose: bool = True) -> list[float]:
        """Evaluate the union of every rank's images, each exactly once, and return the 12 stats on every
        rank. A collective: every rank must call it. Without an initialised process group (or with one
        process) it is :meth:`evaluate`.

        ``per_image`` (default: the backend's ``per_image_default``, True for pycocotools): spread the
        per-image evaluation over the ranks and accumulate on rank 0, or gather the detections on rank 0 and
        evaluate there (see the module docstring for why). Afterwards rank 0 holds every image's detections (for
        :meth:`dump`) and ``coco_eval``; only rank 0 prints the summary when ``verbose``."""
        if _dist_world() == 1:
            return self.evaluate()
        if per_image is None:
            per_image = self._backend.per_image_default
        rank, world = dist.get_rank(), dist.get_world_size()
        self.coco_eval = None
        self.stats = [0.0] * NUM_STATS
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, self.img_ids)
        owned, all_ids = _ownership(seen, rank)
        mine = {i: self._results[i] for i in owned}
        payload: dict[str, Any] = {"rows": _pack_rows(mine)}
        if per_image and owned:
            payload["ids"] = owned
            payload["records"] = self._backend.per_image_state(self._gt(), self._det_array(owned), owned)
        parts: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(payload, parts, dst=0)
        stats: list[Any] = [list(self.stats)]
        if rank == 0:
            assert parts is not None
            self._results = {}
            for part in parts:
                self._results.update(_unpack_rows(part["rows"]))
            assert sorted(self._results) == all_ids
            out = io.StringIO()
            with contextlib.redirect_stdout(out) if not verbose else contextlib.nullcontext():
                if not all_ids:
                    print("CocoEvaluator: no images were evaluated; returning zeros")
                elif per_image:
                    states = [(part["ids"], part["records"]) for part in parts if "records" in part]
                    coco_eval = self._backend.merge(self._gt(), states, all_ids)
                    stats[0] = self._summarize(coco_eval, self.num_detections)
                else:
                    stats[0] = self.evaluate()
        dist.broadcast_object_list(stats, src=0)
        self.stats = [float(s) for s in stats[0]]
        return list(self.stats)

    def dump(self, path: str | Path) -> None:
        """Write the detections as a COCO results JSON (list of image_id/category_id/bbox/score)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            json.dump(self._records(), f)


# ---------------------------------------------------------------------- distributed helpers
def _ownership(seen: list[list[int]], rank: int) -> tuple[list[int], list[int]]:
    """(sorted ids owned by ``rank``: those no lower rank saw, sorted union of all ids)."""
    taken: set[int] = set()
    owned: list[int] = []
    for r, ids in enumerate(seen):
        fresh = [i for i in ids if i not in taken]
        taken.update(fresh)
        if r == rank:
            owned = sorted(fresh)
    return owned, sorted(taken)


def _pack_rows(results: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image detection rows as three arrays (fast to pickle): ids, counts, concatenated rows."""
    ids = sorted(results)
    counts = np.asarray([results[i].shape[0] for i in ids], dtype=np.int64)
    rows = np.concatenate([results[i] for i in ids]) if ids else np.zeros((0, _COLS))
    return {"ids": np.asarray(ids, dtype=np.int64), "counts": counts, "rows": rows}


def _unpack_rows(packed: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    splits = np.split(packed["rows"], np.cumsum(packed["counts"])[:-1]) if len(packed["ids"]) else []
    return dict(zip(packed["ids"].tolist(), splits, strict=True))
