"""COCO box evaluation (Lin et al., "Microsoft COCO", ECCV 2014; metric definitions at
https://cocodataset.org/#detection-eval): AP averaged over IoU 0.50:0.05:0.95 with 101-point interpolated
precision, plus AP50/AP75, per-area AP, and AR at 1/10/100 detections per image.

Detections are stored per image as one float64 array of rows ``[x, y, w, h, score, category_id]``; per-box
Python dicts are only built when handing them to pycocotools' or faster_coco_eval's COCO API in
:meth:`CocoEvaluator.evaluate`, and in ``dump``.

Backends (``train.eval_backend``): ``pycocotools`` (the reference), ``faster_coco_eval`` (its C++
re-implementation: pycocotools' numbers to 1e-12 on our tests, not bit for bit; 6-10x faster on a val2017-sized
set) and ``hotcoco`` (the default; a Rust re-implementation: pycocotools' 12 numbers and precision, recall and
score arrays bit for bit on our tests, ~140x faster), see tests/test_evaluation.py and tools/bench_eval.py.
hotcoco takes the detections as one ``(N, 7)`` array ``[image_id, x, y, w, h, score, category_id]`` (its
``load_res`` fills ``id``, ``area`` = w*h and ``iscrowd`` as pycocotools' ``loadRes`` does), so no Python
dict is built per detection.

Distributed evaluation (:meth:`CocoEvaluator.evaluate_distributed`) counts every image exactly once: an image
seen by several ranks (DistributedSampler pads the last shard with repeated images) belongs to the lowest rank
that saw it. Two strategies, chosen by ``per_image``:

* per image (default for ``pycocotools``): every rank runs COCOeval's per-image evaluation (matching, the
  expensive part) on the images it owns; the per-image records are sent to rank 0 in a compact array form,
  placed in the single-process order (category, area, image id) and accumulated there. The accumulation sees
  exactly the records a single process would compute, so the 12 numbers are identical.
  hotcoco does the same through its ``StreamingEval``: every rank matches its own images, sends the state
  (``to_bytes``), and rank 0 merges the states (``StreamingEval.merge``, no matching redone), then
  accumulates.
* gather (default for ``faster_coco_eval`` and ``hotcoco``): the detections (a few float64 arrays) are
  gathered on rank 0, which runs the backend's whole evaluation. faster_coco_eval's per-image records are
  opaque C++ objects that cost ~12 us each to serialise (1.6 M of them for COCO val2017, ~20 s), more than
  its whole evaluation on one rank (a few seconds); hotcoco evaluates a val2017-sized set in under a second
  on one rank, and its per-image strategy was no faster than gathering (1000 images on 2 processes: 0.20 s
  each). Spreading their per-image step does not make them faster.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

BACKENDS = ("pycocotools", "faster_coco_eval", "hotcoco")
DEFAULT_BACKEND = "hotcoco"
NUM_STATS = 12
_COLS = 6  # x, y, w, h, score, category_id

# Ground truth converted to another backend's COCO class, cached per source object (an evaluator is built
# for every evaluation epoch; converting COCO val2017 again each time would cost seconds).
_CONVERTED_GT: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming the choices if ``backend`` is unknown, ``ImportError`` with the install
    command if its package is missing."""
    _backend_classes(backend)


def _backend_classes(backend: str) -> tuple[type, type]:
    """(COCO, COCOeval) classes of ``backend``."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as err:
            raise ImportError(
                "evaluation backend 'faster_coco_eval' needs the faster-coco-eval package: "
                "pip install faster-coco-eval (or set train.eval_backend=pycocotools)"
            ) from err
        return COCO, COCOeval_faster
    if backend == "hotcoco":
        try:
            from hotcoco import COCO, COCOeval
        except ImportError as err:
            raise ImportError(
                "evaluation backend 'hotcoco' needs the hotcoco package: "
                "pip install hotcoco (or set train.eval_backend=pycocotools)"
            ) from err
        return COCO, COCOeval
    raise ValueError(f"CocoEvaluator: unknown backend {backend!r}; choose one of {BACKENDS}")


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
    """

    def __init__(self, coco_gt: Any, label_to_cat_id: Sequence[int], backend: str = DEFAULT_BACKEND) -> None:
        self._coco_cls, self._eval_cls = _backend_classes(backend)
        self.backend = backend
        self.coco_gt = coco_gt
        self.label_to_cat_id = np.asarray(list(label_to_cat_id), dtype=np.int64)
        unknown = sorted(set(self.label_to_cat_id.tolist()) - set(coco_gt.cats))
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
    def _records(self, img_ids: Sequence[int] | None = None, annotate: bool = False) -> list[dict[str, Any]]:
        """COCO result records ``{"image_id", "category_id", "bbox" [x,y,w,h], "score"}``, image-id order.
        ``annotate``: also the fields ``loadRes`` adds to boxes (``id`` from 1, ``area`` = w*h, ``iscrowd`` 0),
        built in the same pass (half a million records: a second pass costs a noticeable share of a fast
        backend's evaluation)."""
        img_ids = self.img_ids if img_ids is None else list(img_ids)
        rows = [self._results[i] for i in img_ids]
        if not rows or sum(r.shape[0] for r in rows) == 0:
            return []
        all_rows = np.concatenate(rows)
        ids = np.repeat(np.asarray(img_ids, dtype=np.int64), [r.shape[0] for r in rows]).tolist()
        bboxes = all_rows[:, :4].tolist()
        scores = all_rows[:, 4].tolist()
        cats = all_rows[:, 5].astype(np.int64).tolist()
        if not annotate:
            return [
                {"image_id": i, "category_id": c, "bbox": b, "score": s}
                for i, c, b, s in zip(ids, cats, bboxes, scores, strict=True)
            ]
        areas = (all_rows[:, 2] * all_rows[:, 3]).tolist()  # the same float64 product as loadRes's w * h
        return [
            {"image_id": i, "category_id": c, "bbox": b, "score": s, "id": k, "area": a, "iscrowd": 0}
            for k, (i, c, b, s, a) in enumerate(zip(ids, cats, bboxes, scores, areas, strict=True), start=1)
        ]

    def _det_array(self, img_ids: Sequence[int]) -> np.ndarray:
        """The detections of ``img_ids`` as the ``(N, 7)`` float64 array hotcoco's ``load_res`` and
        ``StreamingEval.update`` take: ``[image_id, x, y, w, h, score, category_id]``, image-id order."""
        rows = [self._results[i] for i in img_ids]
        if not rows:
            return np.zeros((0, _COLS + 1))
        ids = np.repeat(np.asarray(img_ids, dtype=np.float64), [r.shape[0] for r in rows])
        return np.concatenate([ids[:, None], np.concatenate(rows)], axis=1)

    def _gt(self) -> Any:
        """The ground truth as the backend's own COCO class (a private deep copy when converting, so the
        two libraries never share the annotation dicts they annotate in place; hotcoco copies the dataset into
        its own structures instead; cached per ``coco_gt``)."""
        if isinstance(self.coco_gt, self._coco_cls):
            return self.coco_gt
        try:
            cache = _CONVERTED_GT.setdefault(self.coco_gt, {})
        except TypeError:  # not weak-referenceable: no cache
            cache = {}
        if self.backend not in cache:
            with contextlib.redirect_stdout(io.StringIO()):
                if self.backend == "hotcoco":
                    gt = self._coco_cls(self.coco_gt.dataset)
                else:
                    gt = self._coco_cls()
                    gt.dataset = copy.deepcopy(self.coco_gt.dataset)
                    gt.createIndex()
            cache[self.backend] = gt
        return cache[self.backend]

    def _result_coco(self, coco_gt: Any, records: list[dict[str, Any]]) -> Any:
        """Result COCO object equivalent to ``coco_gt.loadRes`` for boxes, from records made by
        ``_records(annotate=True)``; also valid for an empty ``records`` (on which pycocotools' loadRes
        fails)."""
        res = self._coco_cls()
        res.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": copy.deepcopy(coco_gt.dataset["categories"]),
            "annotations": records,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            res.createIndex()
        return res

    def _coco_eval(self, img_ids: list[int], separate: bool = False) -> tuple[Any, int]:
        """(the backend's COCOeval over ``img_ids`` with this process's detections, number of detections).
        ``separate``: faster_coco_eval keeps its per-image records for a later, separate accumulate."""
        coco_gt = self._gt()
        if self.backend == "hotcoco":
            detections = self._det_array(img_ids)
            coco_eval = self._eval_cls(coco_gt, coco_gt.load_res(detections), iouType="bbox")
            coco_eval.params.imgIds = list(img_ids)
            return coco_eval, detections.shape[0]
        records = self._records(img_ids, annotate=True)
        kwargs: dict[str, Any] = {}
        if self.backend == "faster_coco_eval":
            kwargs = {"print_function": print, "separate_eval": separate}
        coco_eval = self._eval_cls(coco_gt, self._result_coco(coco_gt, records), iouType="bbox", **kwargs)
        coco_eval.params.imgIds = list(img_ids)
        return coco_eval, len(records)

    def _per_image_records(self, img_ids: list[int]) -> Any:
        """The per-image evaluation of ``img_ids`` (this process's detections), in a form ready to send:
        hotcoco's ``StreamingEval`` state as bytes, or the encoded COCOeval records of the other backends."""
        if self.backend == "hotcoco":
            from hotcoco import StreamingEval

            gt = self._gt()  # the ground truth a single-process evaluation reads
            stream = StreamingEval(gt.loadCats(gt.getCatIds()), iou_type="bbox")
            stream.update(gt.loadImgs(img_ids), gt.loadAnns(gt.getAnnIds(imgIds=img_ids)), self._det_array(img_ids))
            return stream.to_bytes()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval, _ = self._coco_eval(img_ids, separate=True)
            coco_eval.evaluate()
        return _encode_per_image(coco_eval, self.backend)

    def _summarize(self, coco_eval: Any, num_detections: int) -> list[float]:
        self.coco_eval = coco_eval
        self.stats = [0.0] * NUM_STATS
        if num_detections == 0:
            print("CocoEvaluator: no detections; returning zeros")
            return list(self.stats)
        coco_eval.summarize()
        self.stats = [float(s) for s in np.asarray(coco_eval.stats)[:NUM_STATS]]
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
        coco_eval, n = self._coco_eval(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        return self._summarize(coco_eval, n)

    def evaluate_distributed(self, per_image: bool | None = None, verbose: bool = True) -> list[float]:
        """Evaluate the union of every rank's images, each exactly once, and return the 12 stats on every
        rank. A collective: every rank must call it. Without an initialised process group (or with one
        process) it is :meth:`evaluate`.

        ``per_image`` (default: True for pycocotools, False for faster_coco_eval and hotcoco): spread the
        per-image evaluation over the ranks and accumulate on rank 0, or gather the detections on rank 0 and
        evaluate there (see the module docstring for why). Afterwards rank 0 holds every image's detections (for
        :meth:`dump`) and ``coco_eval``; only rank 0 prints the summary when ``verbose``."""
        if _dist_world() == 1:
            return self.evaluate()
        if per_image is None:
            per_image = self.backend == "pycocotools"
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
            payload["records"] = self._per_image_records(owned)
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
                    stats[0] = self._accumulate_parts(parts, all_ids)
                else:
                    stats[0] = self.evaluate()
        dist.broadcast_object_list(stats, src=0)
        self.stats = [float(s) for s in stats[0]]
        return list(self.stats)

    def _accumulate_parts(self, parts: list[dict[str, Any]], all_ids: list[int]) -> list[float]:
        """Rank 0: place every rank's per-image records at their single-process positions, accumulate."""
        num_detections = sum(len(r) for r in self._results.values())
        if self.backend == "hotcoco":
            from hotcoco import StreamingEval

            states = (StreamingEval.from_bytes(part["records"]) for part in parts if "records" in part)
            coco_eval = StreamingEval.merge(states).finalize()
            if list(coco_eval.params.imgIds) != all_ids:
                raise RuntimeError("CocoEvaluator: the merged hotcoco states do not hold every image once")
            coco_eval.accumulate()
            return self._summarize(coco_eval, num_detections)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval, _ = self._coco_eval([], separate=True)
        p = coco_eval.params
        p.imgIds = list(all_ids)
        p.catIds = sorted(np.unique(p.catIds).tolist())
        p.maxDets = sorted(p.maxDets)
        num_ka = len(p.catIds) * len(p.areaRng)
        position = {image_id: n for n, image_id in enumerate(all_ids)}
        merged: list[Any] = [None] * (num_ka * len(all_ids))
        for part in parts:
            if "records" not in part:
                continue
            local = np.asarray([position[i] for i in part["ids"]], dtype=np.int64)
            entries = _decode_per_image(part["records"], self.backend)
            if len(entries) != num_ka * len(local):
                raise RuntimeError("CocoEvaluator: per-image records of a rank do not match the categories")
            target = (np.arange(num_ka)[:, None] * len(all_ids) + local[None, :]).reshape(-1)
            for t, entry in zip(target.tolist(), entries, strict=True):
                merged[t] = entry
        coco_eval._paramsEval = copy.deepcopy(p)
        if self.backend == "faster_coco_eval":
            coco_eval._evalImgs_cpp = merged
        else:
            coco_eval.evalImgs = merged
        coco_eval.accumulate()
        return self._summarize(coco_eval, num_detections)

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


def _encode_per_image(coco_eval: Any, backend: str) -> Any:
    """This rank's per-image records, in COCOeval's (category, area, image) order, ready to send.

    faster_coco_eval: its C++ records as they are (they pickle). pycocotools: the fields ``accumulate``
    reads, as a few flat arrays: which entries exist, per entry the detection count D and ground-truth count
    G, ``dtScores`` (D), ``dtMatches != 0`` (T x D, matched or not: all ``accumulate`` uses),
    ``dtIgnore`` (T x D) and ``gtIgnore`` (G)."""
    if backend == "faster_coco_eval":
        return coco_eval._evalImgs_cpp
    entries = coco_eval.evalImgs
    present = np.asarray([e is not None for e in entries], dtype=bool)
    kept = [e for e in entries if e is not None]
    num_thr = len(coco_eval.params.iouThrs)

    def cat(arrays: list, dtype: type) -> np.ndarray:
        return np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays]) if arrays else \
            np.zeros(0, dtype)

    return {
        "present": np.packbits(present),
        "n": len(entries),
        "T": num_thr,
        "D": np.asarray([len(e["dtScores"]) for e in kept], dtype=np.int64),
        "G": np.asarray([len(e["gtIgnore"]) for e in kept], dtype=np.int64),
        "scores": cat([e["dtScores"] for e in kept], np.float64),
        "matched": np.packbits(cat([e["dtMatches"] for e in kept], bool)),
        "dt_ignore": np.packbits(cat([e["dtIgnore"] for e in kept], bool)),
        "gt_ignore": np.packbits(cat([e["gtIgnore"] for e in kept], bool)),
    }


def _decode_per_image(encoded: Any, backend: str) -> list[Any]:
    """The inverse of :func:`_encode_per_image`: a list in COCOeval's ``evalImgs`` layout (None for absent
    entries); decoded pycocotools entries carry only the fields ``accumulate`` reads."""
    if backend == "faster_coco_eval":
        return list(encoded)
    n, num_thr = encoded["n"], encoded["T"]
    present = np.unpackbits(encoded["present"], count=n).astype(bool)
    d, g = encoded["D"], encoded["G"]
    td_ends = np.cumsum(d * num_thr)
    matched = np.unpackbits(encoded["matched"], count=int(td_ends[-1]) if len(d) else 0).astype(bool)
    dt_ignore = np.unpackbits(encoded["dt_ignore"], count=int(td_ends[-1]) if len(d) else 0).astype(bool)
    gt_ignore = np.unpackbits(encoded["gt_ignore"], count=int(g.sum())).astype(bool)
    scores = np.split(encoded["scores"], np.cumsum(d)[:-1]) if len(d) else []
    m_parts = np.split(matched, td_ends[:-1]) if len(d) else []
    i_parts = np.split(dt_ignore, td_ends[:-1]) if len(d) else []
    g_parts = np.split(gt_ignore, np.cumsum(g)[:-1]) if len(g) else []
    out: list[Any] = [None] * n
    for slot, dd, s, m, ig, gi in zip(np.flatnonzero(present).tolist(), d.tolist(), scores, m_parts, i_parts,
                                      g_parts, strict=True):
        out[slot] = {"dtScores": s, "dtMatches": m.reshape(num_thr, dd), "dtIgnore": ig.reshape(num_thr, dd),
                     "gtIgnore": gi}
    return out
