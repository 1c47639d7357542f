"""Synthetic COCO-style ground truth and detections, for evaluator tests and benchmarks (no images needed).

The defaults mimic COCO val2017 (Lin et al., ECCV 2014): 5000 images of about 640x480, 80 categories with
COCO's non-contiguous ids, about 7.3 boxes per image with a long tail, ~1% images without annotations, ~1%
crowd boxes, a mask ``area`` smaller than the box (as for COCO's segmentation areas), object sizes spread over
the small / medium / large ranges, and a fixed number of detections per image: jittered copies of the ground
truth (sometimes with the wrong class) plus background boxes, scores rounded to float32 like a model's.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch

# COCO's 80 category ids (1..90 with gaps).
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)


def synthetic_coco(
    num_images: int = 5000,
    seed: int = 0,
    num_categories: int = 80,
    mean_boxes: float = 7.3,
    empty_fraction: float = 0.01,
    crowd_fraction: float = 0.01,
    detections_per_image: int = 100,
    score_levels: int = 0,
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """(COCO ground-truth dataset dict, ``{image_id: rows (n, 6) [x, y, w, h, score, category_id]}``).

    ``score_levels`` > 0 rounds scores to that many levels, so that many detections tie (pycocotools breaks
    ties by a stable sort: backends must agree on the order too). Every image gets ``detections_per_image``
    detections except one image in 50, which gets none."""
    rng = np.random.default_rng(seed)
    if num_categories > len(COCO_CATEGORY_IDS):
        cat_ids = np.arange(1, num_categories + 1)
    else:
        cat_ids = np.asarray(COCO_CATEGORY_IDS[:num_categories])
    cat_freq = rng.dirichlet(np.full(len(cat_ids), 0.6))  # a few frequent classes, a long tail
    image_ids = np.sort(rng.choice(10 * num_images + 10, size=num_images, replace=False) + 1)
    heights = rng.integers(240, 641, num_images)
    widths = rng.integers(320, 641, num_images)
    # Geometric-like counts with mean ``mean_boxes``; some images have no annotation at all.
    counts = rng.geometric(1.0 / (mean_boxes + 1.0), num_images) - 1
    counts[rng.random(num_images) < empty_fraction] = 0

    images = [
        {"id": int(i), "height": int(h), "width": int(w), "file_name": f"{int(i):012d}.jpg"}
        for i, h, w in zip(image_ids, heights, widths, strict=True)
    ]
    annotations: list[dict[str, Any]] = []
    detections: dict[int, np.ndarray] = {}
    ann_id = 1
    for index, image_id in enumerate(image_ids.tolist()):
        h, w, n = float(heights[index]), float(widths[index]), int(counts[index])
        gt = _random_boxes(rng, n, w, h)
        gt_cats = rng.choice(cat_ids, size=n, p=cat_freq)
        crowd = rng.random(n) < crowd_fraction
        area = gt[:, 2] * gt[:, 3] * rng.uniform(0.45, 0.95, n)
        for box, cat, is_crowd, a in zip(gt.tolist(), gt_cats.tolist(), crowd.tolist(), area.tolist(), strict=True):
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": int(cat), "bbox": box,
                                "area": float(a), "iscrowd": int(is_crowd)})
            ann_id += 1
        if index % 50 == 49:
            detections[image_id] = np.zeros((0, 6))
            continue
        detections[image_id] = _detections(rng, gt, gt_cats, cat_ids, cat_freq, w, h, detections_per_image,
                                           score_levels)
    dataset = {
        "info": {"description": f"synthetic COCO-like set (seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(c), "name": f"class{int(c)}", "supercategory": "none"} for c in cat_ids],
    }
    return dataset, detections


def _random_boxes(rng: np.random.Generator, n: int, w: float, h: float) -> np.ndarray:
    """(n, 4) xywh boxes inside a w x h image: log-uniform area from 3^2 px to half the image, aspect ratio
    log-uniform in [1/3, 3] (about 40% small, 35% medium, 25% large on 640x480, as in COCO)."""
    area = np.exp(rng.uniform(np.log(9.0), np.log(0.5 * w * h), n))
    aspect = np.exp(rng.uniform(-np.log(3.0), np.log(3.0), n))
    bw = np.minimum(np.sqrt(area * aspect), w - 1.0)
    bh = np.minimum(np.sqrt(area / aspect), h - 1.0)
    x = rng.uniform(0.0, 1.0, n) * (w - bw)
    y = rng.uniform(0.0, 1.0, n) * (h - bh)
    return np.stack([x, y, bw, bh], axis=1)


def _detections(rng: np.random.Generator, gt: np.ndarray, gt_cats: np.ndarray, cat_ids: np.ndarray,
                cat_freq: np.ndarray, w: float, h: float, count: int, score_levels: int) -> np.ndarray:
    # Jittered copies of ground truth: 0..3 per object, right class 80% of the time.
    copies = np.repeat(np.arange(len(gt)), rng.integers(0, 4, len(gt)))[:count]
    jitter = rng.normal(0.0, 0.12, (len(copies), 4)) * np.tile(gt[copies, 2:], 2)
    near = gt[copies] + jitter
    near[:, 2:] = np.maximum(near[:, 2:], 1.0)
    near_cats = np.where(rng.random(len(copies)) < 0.8, gt_cats[copies], rng.choice(cat_ids, len(copies), p=cat_freq))
    near_scores = rng.beta(4.0, 2.0, len(copies))
    # Background detections fill the rest.
    m = count - len(copies)
    far = _random_boxes(rng, m, w, h)
    far_cats = rng.choice(cat_ids, m, p=cat_freq)
    far_scores = rng.beta(1.0, 6.0, m)
    rows = np.zeros((count, 6))
    rows[:, :4] = np.concatenate([near, far])
    scores = np.concatenate([near_scores, far_scores]).astype(np.float32).astype(np.float64)
    if score_levels > 0:
        scores = np.round(scores * score_levels) / score_levels
    rows[:, 4] = scores
    rows[:, 5] = np.concatenate([near_cats, far_cats])
    return rows[rng.permutation(count)]


def coco_from_dataset(dataset: dict[str, Any]) -> Any:
    """A pycocotools ``COCO`` indexing ``dataset`` (quietly)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def rows_to_predictions(rows: np.ndarray, cat_id_to_label: dict[int, int]) -> dict[str, torch.Tensor]:
    """Rows ``[x, y, w, h, score, category_id]`` as a :class:`CocoEvaluator` prediction (xyxy boxes, labels)."""
    boxes = torch.as_tensor(rows[:, :4], dtype=torch.float64).clone()
    boxes[:, 2:] += boxes[:, :2]
    labels = torch.as_tensor([cat_id_to_label[int(c)] for c in rows[:, 5]], dtype=torch.int64)
    return {"boxes": boxes, "scores": torch.as_tensor(rows[:, 4], dtype=torch.float64), "labels": labels}


def records(detections: dict[int, np.ndarray]) -> list[dict[str, Any]]:
    """COCO result records (image_id, category_id, bbox, score) of ``detections``, image-id order."""
    out = []
    for image_id in sorted(detections):
        for row in detections[image_id].tolist():
            out.append({"image_id": image_id, "category_id": int(row[5]), "bbox": row[:4], "score": row[4]})
    return out
