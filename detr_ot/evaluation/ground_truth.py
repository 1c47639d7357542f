"""The evaluator's ground truth: a box-only copy of a COCO annotation file, loaded into a backend at start-up.

Annotation files written by other tools carry fields box evaluation never reads (polygons as lists of
``{"exterior": [[x, y], ...]}`` objects, keypoints, attributes) and a backend may reject such a field even
though the boxes are fine. So a backend receives only:

* images: ``id``, and ``width``, ``height``, ``file_name`` when they are well-formed;
* categories: ``id``, ``name`` (a string; the id when absent), ``supercategory`` (a string) when present;
* annotations: ``id``, ``image_id``, ``category_id``, ``bbox``, ``area``, ``iscrowd``.

Filled or changed on the way, each so that every backend gives pycocotools' numbers (Lin et al., "Microsoft
COCO", ECCV 2014; pycocotools' ``COCOeval`` is the reference implementation):

* ``area`` missing: the box's w * h. pycocotools reads ``area`` of every ground truth for the area ranges and
  fails without it, so there is no number of its own to match; w * h is what its ``loadRes`` gives a detection
  box and what the dataset loader fills in.
* ``iscrowd`` missing: 0 (pycocotools reads ``int(g["iscrowd"])`` of every ground truth and fails without it).
* ``ignore``: dropped. pycocotools' ``COCOeval._prepare`` overwrites it with ``iscrowd`` before using it, so
  it never changes pycocotools' numbers, while another backend might honour it.
* annotation ids: renumbered 1..N in file order. pycocotools records a detection's match as the matched
  ground truth's id, 0 meaning "unmatched", so a ground truth of id 0 would never count as detected; with
  ids in file order, every backend also sees the annotations in pycocotools' order (ties in IoU go by it).

Lists keep the file's order and length, so ``annotations[i]`` in a backend's message is the file's record i.
The backend's ground-truth object is built, and one tiny trial evaluation run, when the evaluator's ground
truth is prepared (the trainer does it before the first epoch): a file a backend rejects fails at start-up
with an :class:`EvalGroundTruthError` naming the file, the record and the field.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detr_ot.data.coco import AnnotationError
from detr_ot.evaluation.backends import DET_COLS, EvalBackend, get_backend

__all__ = ["EvalGroundTruth", "EvalGroundTruthError", "box_dataset", "prepare_ground_truth"]

_TRIAL_IMAGES = 8  # images with annotations in the start-up trial evaluation

# Prepared ground truth per source object and backend (an evaluator is built for every evaluation epoch).
_CACHE: weakref.WeakKeyDictionary[Any, dict[str, EvalGroundTruth]] = weakref.WeakKeyDictionary()


class EvalGroundTruthError(AnnotationError):
    """The ground truth cannot be evaluated (malformed for box evaluation, or rejected by the backend)."""


@dataclass(frozen=True, eq=False)
class EvalGroundTruth:
    """A backend's ground truth. ``dataset``: the box-only dict the backend was given (see the module
    docstring); ``native``: the backend's own object; ``source``: the file (or description) for messages."""

    source: str
    backend: EvalBackend
    dataset: dict[str, Any]
    native: Any
    image_ids: frozenset[int] = field(init=False)
    cat_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_ids", frozenset(img["id"] for img in self.dataset["images"]))
        object.__setattr__(self, "cat_ids", frozenset(cat["id"] for cat in self.dataset["categories"]))

    @property
    def backend_name(self) -> str:
        return self.backend.name


def prepare_ground_truth(coco_gt: Any, backend: str, source: str | os.PathLike | None = None) -> EvalGroundTruth:
    """The evaluator's ground truth of ``coco_gt`` for ``backend``: its box-only copy loaded into the backend,
    checked by a trial evaluation of a few images. Call it at start-up, so that a file the backend cannot take
    fails before training.

    ``coco_gt``: a COCO object with a ``dataset`` dict (pycocotools, faster_coco_eval, hotcoco), a dataset dict,
    the path of an annotation JSON, or an :class:`EvalGroundTruth`. ``source`` names the file in messages (a
    path's own name by default). Cached per ``coco_gt`` object and backend. Raises ``ValueError`` /
    ``ImportError`` for an unknown / missing backend and :class:`EvalGroundTruthError` for a ground truth that
    cannot be evaluated."""
    if isinstance(coco_gt, EvalGroundTruth):
        if coco_gt.backend_name == backend:
            return coco_gt
        source = source if source is not None else coco_gt.source
        coco_gt = coco_gt.dataset
    try:
        cached = _CACHE.get(coco_gt)
    except TypeError:  # not weak-referenceable (a dict, a path): no cache
        cached = None
    if cached is not None and backend in cached:
        return cached[backend]

    impl = get_backend(backend)
    if isinstance(coco_gt, (str, os.PathLike)):
        source = source if source is not None else str(coco_gt)
        with open(coco_gt, encoding="utf-8") as f:
            coco_gt = json.load(f)
    name = str(source) if source is not None else "the ground-truth COCO dataset"
    original = coco_gt.dataset if hasattr(coco_gt, "dataset") else coco_gt
    if not isinstance(original, Mapping):
        raise TypeError(f"CocoEvaluator: expected a COCO object, a COCO dataset dict or a path, got "
                        f"{type(coco_gt).__name__}")
    dataset = box_dataset(original, name)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            native = impl.load_gt(dataset)
    except Exception as err:  # any library error becomes a message naming the record
        raise _rejected(name, impl.name, "loading", err, original) from err
    gt = EvalGroundTruth(name, impl, dataset, native)
    _trial(gt, original)
    with contextlib.suppress(TypeError):
        _CACHE.setdefault(coco_gt, {})[backend] = gt
    return gt


def _trial(gt: EvalGroundTruth, original: Mapping[str, Any]) -> None:
    """Evaluate the first images with annotations (and one without) against their own non-crowd boxes, so a
    backend that fails only when evaluating fails now rather than after an epoch."""
    annotated = sorted({a["image_id"] for a in gt.dataset["annotations"]})[:_TRIAL_IMAGES]
    bare = sorted(gt.image_ids - set(annotated))[:1]
    img_ids = sorted(annotated + bare)
    if not img_ids:
        return
    chosen = set(img_ids)
    rows = [[a["image_id"], *a["bbox"], 1.0, a["category_id"]] for a in gt.dataset["annotations"]
            if a["image_id"] in chosen and not a["iscrowd"]]
    detections = np.asarray(rows, dtype=np.float64).reshape(-1, DET_COLS)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = gt.backend.evaluate(gt.native, detections, img_ids)
            stats = gt.backend.summarize(coco_eval) if len(rows) else []
    except Exception as err:
        raise _rejected(gt.source, gt.backend_name, "a trial evaluation of images "
                        f"{img_ids}", err, original) from err
    if not all(math.isfinite(s) for s in stats):
        raise EvalGroundTruthError(f"{gt.source}: backend {gt.backend_name!r} gives non-finite statistics "
                                   f"{stats} on a trial evaluation; use train.eval_backend=pycocotools")


_RECORD = re.compile(r"\b(images|categories|annotations)\[(\d+)\]")


def _rejected(source: str, backend: str, stage: str, err: Exception, original: Mapping[str, Any]
              ) -> EvalGroundTruthError:
    """The error for a backend that rejects the box-only ground truth: the file, the backend's own message,
    the record it names (with its ids: the lists keep the file's order), and the way out."""
    message = f"{type(err).__name__}: {err}"
    where = ""
    found = _RECORD.search(str(err))
    if found:
        key, index = found.group(1), int(found.group(2))
        records = original.get(key)
        if isinstance(records, list) and index < len(records) and isinstance(records[index], Mapping):
            where = f" ({key}[{index}] of the file is {_describe(key, records[index])})"
    return EvalGroundTruthError(
        f"{source}: evaluation backend {backend!r} rejects the ground truth ({stage}): {message}{where}. "
        "The backend was sent only the box fields (images: id, width, height, file_name; categories: id, name, "
        "supercategory; annotations: id, image_id, category_id, bbox, area, iscrowd). Fix the record or use "
        "train.eval_backend=pycocotools"
    )


def _describe(key: str, record: Mapping[str, Any]) -> str:
    if key == "annotations":
        return f"annotation id {record.get('id')!r} of image id {record.get('image_id')!r}"
    if key == "images":
        return f"image id {record.get('id')!r} ({record.get('file_name')!r})"
    return f"category id {record.get('id')!r} ({record.get('name')!r})"


# ---------------------------------------------------------------------------------------- box-only copy
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    """A finite int or float (numpy's included), not a bool; the common types first (37k boxes in val2017)."""
    kind = type(v)
    if kind is float:
        return math.isfinite(v)
    if kind is int:
        return True
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(v)


def box_dataset(dataset: Mapping[str, Any], source: str = "the ground truth") -> dict[str, Any]:
    """The box-only copy of a COCO ``dataset`` dict a backend receives (see the module docstring), checked:
    :class:`EvalGroundTruthError` naming ``source``, the record and the field for anything box evaluation
    cannot use. The input is not modified."""

    def fail(where: str, what: str) -> EvalGroundTruthError:
        return EvalGroundTruthError(f"{source}: {where}: {what}")

    def records(key: str, required: bool) -> list[Any]:
        value = dataset.get(key)
        if value is None and not required:
            return []
        if not isinstance(value, list):
            raise fail(f"field {key!r}", f"expected a list, got {type(value).__name__}")
        return value

    images: list[dict[str, Any]] = []
    for i, img in enumerate(records("images", True)):
        if not isinstance(img, Mapping) or not _is_int(img.get("id")):
            raise fail(f"images[{i}]", f"field 'id' must be an integer, got {_field(img, 'id')}")
        out: dict[str, Any] = {"id": int(img["id"])}
        for key in ("width", "height"):
            value = img.get(key)
            if _is_real(value) and value > 0 and float(value).is_integer():
                out[key] = int(value)
        if isinstance(img.get("file_name"), str):
            out["file_name"] = img["file_name"]
        images.append(out)
    image_ids = _unique([img["id"] for img in images], "images", "image", fail)

    categories: list[dict[str, Any]] = []
    for i, cat in enumerate(records("categories", True)):
        if not isinstance(cat, Mapping) or not _is_int(cat.get("id")):
            raise fail(f"categories[{i}]", f"field 'id' must be an integer, got {_field(cat, 'id')}")
        name = cat.get("name")
        out = {"id": int(cat["id"]), "name": str(cat["id"]) if name is None else str(name)}
        if cat.get("supercategory") is not None:
            out["supercategory"] = str(cat["supercategory"])
        categories.append(out)
    cat_ids = _unique([cat["id"] for cat in categories], "categories", "category", fail)

    annotations: list[dict[str, Any]] = []
    for i, ann in enumerate(records("annotations", False)):
        if not isinstance(ann, Mapping):
            raise fail(f"annotations[{i}]", f"expected an object, got {type(ann).__name__}")
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if not (_is_int(image_id) and int(image_id) in image_ids):
            raise fail(_where(i, ann), f"field 'image_id' {image_id!r} is not the id of an entry of 'images'")
        if not (_is_int(category_id) and int(category_id) in cat_ids):
            raise fail(_where(i, ann), f"field 'category_id' {category_id!r} is not the id of an entry of 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_real, bbox))):
            raise fail(_where(i, ann),
                       f"field 'bbox' must be [x, y, width, height] of 4 finite numbers, got {bbox!r:.200}")
        bbox = [float(v) for v in bbox]
        area = ann.get("area")
        if area is None:
            area = bbox[2] * bbox[3]
        elif not _is_real(area):
            raise fail(_where(i, ann), f"field 'area' must be a finite number, got {area!r:.100}")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd is None:
            iscrowd = 0
        if not (isinstance(iscrowd, (bool, int, float, np.integer, np.floating, np.bool_)) and iscrowd in (0, 1)):
            raise fail(_where(i, ann), f"field 'iscrowd' must be 0 or 1, got {iscrowd!r:.100}")
        annotations.append({"id": i + 1, "image_id": int(image_id), "category_id": int(category_id), "bbox": bbox,
                            "area": float(area), "iscrowd": int(iscrowd)})
    return {"images": images, "categories": categories, "annotations": annotations}


def _where(i: int, ann: Mapping[str, Any]) -> str:
    return f"annotations[{i}] (annotation id {ann.get('id')!r}, image id {ann.get('image_id')!r})"


def _field(record: Any, key: str) -> str:
    if not isinstance(record, Mapping):
        return f"a {type(record).__name__} record"
    return repr(record.get(key)) if key in record else "no such field"


def _unique(ids: list[int], key: str, kind: str, fail: Any) -> set[int]:
    seen: set[int] = set()
    for i, x in enumerate(ids):
        if x in seen:
            raise fail(f"{key}[{i}]", f"duplicate {kind} id {x}")
        seen.add(x)
    return seen

