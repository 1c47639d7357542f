"""COCO-format detection dataset, loaded through pycocotools and validated at construction.

Every annotation file goes through the same checks (COCO itself and the synthetic shapes dataset), so bad
input fails at start-up with an error naming the file and the record, not deep inside a training step.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import Dataset

__all__ = ["AnnotationError", "CocoDetection", "load_coco_annotations"]


class AnnotationError(ValueError):
    """A COCO annotation file (or one of its records) is malformed."""


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_coco_annotations(ann_file: str | os.PathLike) -> COCO:
    """Read, validate and index a COCO detection annotation file; returns a pycocotools ``COCO``.

    Missing ``area`` / ``iscrowd`` fields are filled in (box area w * h / 0) so that ``COCOeval`` works on the
    result (pycocotools reads both fields of every ground truth and fails without them). Annotation ids are
    renumbered 1..N in file order when one of them is 0: pycocotools' ``COCOeval`` records a detection's
    match as the matched ground truth's id, with 0 meaning "unmatched", so a ground truth of id 0 could never
    be counted as detected. Category and image ids are kept as they are (0 included). Raises
    FileNotFoundError for a missing file and AnnotationError (a ValueError) naming the file and the offending
    record for anything malformed."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{ann_file}: malformed JSON ({e})") from e
    _validate(data, ann_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress messages
        coco.createIndex()
    return coco


def _validate(data: Any, ann_file: Path) -> None:
    if not isinstance(data, dict):
        raise AnnotationError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{ann_file}: missing or non-list {key!r} field")
    anns = data.setdefault("annotations", [])
    if not isinstance(anns, list):
        raise AnnotationError(f"{ann_file}: 'annotations' must be a list")

    image_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)):
            raise AnnotationError(f"{ann_file}: images[{i}] needs an integer 'id' and a string 'file_name'")
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise AnnotationError(
                    f"{ann_file}: image id {img['id']} ({img['file_name']}) has invalid {key} "
                    f"{img.get(key)!r}"
                )
        if img["id"] in image_ids:
            raise AnnotationError(f"{ann_file}: duplicate image id {img['id']}")
        image_ids.add(img["id"])

    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise AnnotationError(f"{ann_file}: categories[{i}] needs an integer 'id'")
        if cat["id"] in cat_ids:
            raise AnnotationError(f"{ann_file}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
        cat.setdefault("name", str(cat["id"]))
    if not cat_ids:
        raise AnnotationError(f"{ann_file}: 'categories' is empty")

    required = {"id", "image_id", "category_id", "bbox"}
    ann_ids: set[int] = set()
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or not required <= ann.keys():
            raise AnnotationError(
                f"{ann_file}: annotations[{i}] must be an object with fields {sorted(required)}, "
                f"got {ann!r:.200}"
            )
        aid = ann["id"]
        if aid in ann_ids:
            raise AnnotationError(f"{ann_file}: duplicate annotation id {aid} (image id {ann['image_id']})")
        ann_ids.add(aid)
        if ann["image_id"] not in image_ids:
            raise AnnotationError(
                f"{ann_file}: annotation id {aid} refers to image id {ann['image_id']}, "
                "which is not in 'images'"
            )
        if ann["category_id"] not in cat_ids:
            raise AnnotationError(
                f"{ann_file}: annotation id {aid} (image id {ann['image_id']}) has category id "
                f"{ann['category_id']!r}, which is not in 'categories' (ids {sorted(cat_ids)})"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            raise AnnotationError(
                f"{ann_file}: annotation id {aid} (image id {ann['image_id']}) has a malformed bbox "
                f"{bbox!r:.200}; expected [x, y, width, height] of 4 finite numbers"
            )
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise AnnotationError(
                f"{ann_file}: annotation id {aid} (image id {ann['image_id']}) has a non-positive box size "
                f"(width {bbox[2]}, height {bbox[3]}) in bbox {bbox}"
            )
        if ann.setdefault("iscrowd", 0) not in (0, 1):
            raise AnnotationError(
                f"{ann_file}: annotation id {aid} (image id {ann['image_id']}) has iscrowd {ann['iscrowd']!r}"
            )
        ann.setdefault("area", float(bbox[2] * bbox[3]))
    if 0 in ann_ids:  # see load_coco_annotations: id 0 is COCOeval's "unmatched" marker
        for new_id, ann in enumerate(anns, start=1):
            ann["id"] = new_id


_EXIF_ORIENTATION = 0x0112  # EXIF tag: 1 upright; 2-4 mirrored / rotated 180; 5-8 rotated by 90 (w, h swap)


def _upright(img: Image.Image, expected: tuple[int, int], path: Path, image_id: int, ann_file: Path) -> Image.Image:
    """The RGB image as the annotations saw it. A camera's EXIF orientation tag is applied, as image viewers
    and annotation tools do, when the annotation file's (width, height) are those of the upright image (and
    always for a rotation by 180 degrees or a mirroring, which keep the size); the stored pixels are used as
    they are when the file gives their size instead. Any other size is an AnnotationError."""
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    raw = img.size
    upright = (raw[1], raw[0]) if orientation in (5, 6, 7, 8) else raw
    if orientation not in (0, 1) and expected == upright:
        return ImageOps.exif_transpose(img).convert("RGB")
    if expected == raw:
        return img.convert("RGB")
    exif = f" (upright after its EXIF orientation {orientation}: {upright[0]}x{upright[1]})" if upright != raw else ""
    raise AnnotationError(
        f"{path} is {raw[0]}x{raw[1]} on disk{exif} but {ann_file} says {expected[0]}x{expected[1]} "
        f"(image id {image_id})"
    )


class CocoDetection(Dataset):
    """COCO-format detection dataset.

    Item: ``(image, target)`` after ``transforms``; without transforms ``image`` is the RGB PIL image (upright:
    a camera's EXIF orientation is applied when the annotation file gives the upright size) and
    ``target["boxes"]`` absolute xyxy. Target keys: ``boxes`` (M, 4) float32, ``labels`` (M,) int64 contiguous
    labels, ``image_id`` int, ``area`` (M,) float32, ``iscrowd`` (M,) int64, ``orig_size`` / ``size`` int64
    [h, w]. Boxes are clipped to the image and degenerate ones dropped; with ``train=True`` crowd boxes are
    dropped too. Images without annotations are kept (``boxes`` of shape (0, 4)).

    Attributes: ``coco`` (pycocotools COCO), ``ids`` (sorted image ids; index -> image id),
    ``label_to_cat_id`` (list, label -> category id, sorted by category id), ``cat_id_to_label``,
    ``class_names`` (label order), ``num_classes``.

    Labels are contiguous, 0..K-1 over every category the file lists (with annotations or not), whatever the
    ids: ids need not start at 1 or be consecutive, and a category of id 0 (e.g. one named "background") is
    an ordinary class, label 0 if it has the smallest id. The softmax head's no-object class is index K, after
    the real classes, and padded target slots in a batch are masked out, so neither is confused with label 0.
    Detections go back to the file's own category ids through ``label_to_cat_id`` (see
    :meth:`labels_to_cat_ids`), which is what COCO evaluation counts.
    """

    def __init__(
        self,
        img_folder: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable[[Any, dict], tuple[Any, dict]] | None = None,
        train: bool = False,
    ) -> None:
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.train = train
        self.coco = load_coco_annotations(self.ann_file)
        self._check_images_on_disk()

        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.label_to_cat_id: list[int] = [int(c["id"]) for c in cats]
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = [str(c["name"]) for c in cats]
        self.num_classes: int = len(cats)
        self.ids: list[int] = sorted(self.coco.imgs)

    def _check_images_on_disk(self) -> None:
        if not self.img_folder.is_dir():
            raise FileNotFoundError(
                f"image folder {self.img_folder} (for annotation file {self.ann_file}) does not exist"
            )
        with os.scandir(self.img_folder) as it:
            present = {entry.name for entry in it}
        missing = [
            img
            for img in self.coco.dataset["images"]
            if img["file_name"] not in present
            and not ("/" in img["file_name"] and (self.img_folder / img["file_name"]).is_file())
        ]
        if missing:
            first = missing[0]
            raise FileNotFoundError(
                f"image file {self.img_folder / first['file_name']} (image id {first['id']}) listed in "
                f"{self.ann_file} is missing on disk ({len(missing)} of {len(self.coco.dataset['images'])} "
                "listed images missing)"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def labels_to_cat_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Contiguous labels (any shape, int) -> the annotation file's category ids (int64)."""
        lut = torch.tensor(self.label_to_cat_id, dtype=torch.int64, device=labels.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got {labels.min()}..{labels.max()}")
        return lut[labels.long()]

    def load_target(self, image_id: int, width: int, height: int) -> dict[str, Any]:
        """Target dict (absolute xyxy boxes, clipped to ``width`` x ``height``) of one image."""
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.train:
            anns = [a for a in anns if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        area = torch.tensor([a["area"] for a in anns], dtype=torch.float32)
        iscrowd = torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64)
        size = torch.tensor([height, width], dtype=torch.int64)
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": int(image_id),
            "area": area[keep],
            "iscrowd": iscrowd[keep],
            "orig_size": size,
            "size": size.clone(),
        }

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.img_folder / info["file_name"]
        with Image.open(path) as img:
            image = _upright(img, (info["width"], info["height"]), path, image_id, self.ann_file)
        width, height = image.size
        target = self.load_target(image_id, width, height)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, classes={self.num_classes}, "
            f"folder={self.img_folder}, ann_file={self.ann_file}, train={self.train})"
        )
