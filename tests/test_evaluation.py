"""CocoEvaluator and PostProcess against hand-worked values, an independent numpy COCO-AP50 reference,
direct pycocotools calls, and the faster_coco_eval and hotcoco backends; unusual ground truth (files of other
annotation tools) through every backend: pycocotools' numbers or a named failure when the evaluator's ground
truth is prepared, which the trainer does before the first epoch."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SHAPES_YAML, tiny_overrides
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ot.config import load_config
from detr_ot.engine import trainer
from detr_ot.engine.trainer import run
from detr_ot.evaluation import CocoEvaluator, EvalGroundTruthError, prepare_ground_truth
from detr_ot.evaluation.backends import EVAL_BACKENDS
from detr_ot.evaluation.backends.pycocotools_backend import PycocotoolsBackend
from detr_ot.evaluation.ground_truth import box_dataset
from detr_ot.evaluation.synthetic import coco_from_dataset, records, rows_to_predictions, synthetic_coco
from detr_ot.models.postprocess import PostProcess

BACKENDS = ["pycocotools", "faster_coco_eval", "hotcoco"]
# Backends that give pycocotools' numbers bit for bit on these tests (the others: to 1e-12).
BIT_IDENTICAL = {"pycocotools", "hotcoco"}


# --------------------------------------------------------------------------- helpers
def make_coco(images: list[tuple[int, int, int]], anns: list[dict], cat_ids: list[int]) -> COCO:
    """pycocotools COCO from (id, h, w) images and {image_id, category_id, bbox xywh[, iscrowd]} anns."""
    dataset = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, h, w in images],
        "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
        "annotations": [
            {
                "id": k + 1,
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": list(map(float, a["bbox"])),
                "area": float(a["bbox"][2] * a["bbox"][3]),
                "iscrowd": int(a.get("iscrowd", 0)),
            }
            for k, a in enumerate(anns)
        ],
    }
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def pred(boxes_xyxy, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.as_tensor(scores, dtype=torch.float32).reshape(-1),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
    }


def xywh_to_xyxy(b) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def run_eval(evaluator: CocoEvaluator) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()


def ap101(tp_sorted: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP (COCO) of detections already sorted by decreasing score."""
    tp = np.cumsum(tp_sorted)
    fp = np.cumsum(1 - tp_sorted)
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    total = 0.0
    for r in np.linspace(0.0, 1.0, 101):
        hit = np.nonzero(recall >= r)[0]
        total += envelope[hit[0]] if len(hit) else 0.0
    return total / 101


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes (N,4) x (M,4)."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    return inter / (a[:, 2:].prod(1)[:, None] + b[:, 2:].prod(1)[None] - inter)


def reference_ap50(gt_anns: list[dict], dets: dict[int, list[tuple]], img_ids: list[int], cat_ids) -> float:
    """Independent COCO AP@0.5 (area all, <100 dets per image and class, no crowd): greedy matching of each
    detection, by decreasing score, to the best-IoU unmatched GT with IoU >= 0.5; mean over classes with GT.
    """
    aps = []
    for cat in cat_ids:
        flags, scores, n_gt = [], [], 0
        for img in img_ids:
            g = np.array([a["bbox"] for a in gt_anns if a["image_id"] == img and a["category_id"] == cat])
            d = sorted([x for x in dets.get(img, []) if x[2] == cat], key=lambda x: -x[1])
            n_gt += len(g)
            used = np.zeros(len(g), bool)
            for box, score, _ in d:
                ok = 0
                if len(g):
                    iou = box_iou_np(np.array([box]), g)[0]
                    iou[used] = -1
                    j = int(np.argmax(iou))
                    if iou[j] >= 0.5:
                        used[j], ok = True, 1
                flags.append(ok)
                scores.append(score)
        if n_gt == 0:
            continue
        order = np.argsort(-np.asarray(scores), kind="mergesort")
        aps.append(ap101(np.asarray(flags, dtype=float)[order], n_gt))
    return float(np.mean(aps))


# --------------------------------------------------------------------------- (a) hand-worked AP
GT1, GT2 = [10.0, 20.0, 200.0, 150.0], [300.0, 200.0, 150.0, 120.0]  # both "large" (area > 96^2)


def hand_coco() -> COCO:
    anns = [{"image_id": 1, "category_id": 7, "bbox": GT1}, {"image_id": 1, "category_id": 7, "bbox": GT2}]
    return make_coco([(1, 480, 640)], anns, [3, 7])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_ap(backend: str) -> None:
    ev = CocoEvaluator(hand_coco(), label_to_cat_id=[3, 7], backend=backend)
    boxes = [xywh_to_xyxy(GT1), [450, 330, 640, 480], xywh_to_xyxy(GT2)]  # FP: large, IoU 0
    ev.update({1: pred(boxes, [0.9, 0.8, 0.7], [1, 1, 1])})
    stats = run_eval(ev)
    # TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; interpolated precision is 1 for the 51
    # recall points 0..0.50 and 2/3 for the 50 points 0.51..1.00. Exact matches: same AP at every IoU.
    hand = (51 * 1.0 + 50 * (2.0 / 3.0)) / 101
    assert ap101(np.array([1.0, 0.0, 1.0]), 2) == pytest.approx(hand, abs=1e-15)
    assert all(isinstance(s, float) for s in stats) and len(stats) == 12
    for idx in (0, 1, 2, 5):  # AP, AP50, AP75, APl
        assert abs(stats[idx] - hand) < 1e-9
    assert stats[3] == -1 and stats[4] == -1  # no small / medium GT
    assert stats[6] == 0.5  # AR@1: only the 0.9 detection
    assert stats[7] == 1.0 and stats[8] == 1.0 and stats[11] == 1.0
    assert ev.coco_eval.eval["precision"].shape == (10, 101, 2, 4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_and_missing_detections(backend: str) -> None:
    coco = hand_coco()
    ev = CocoEvaluator(coco, [3, 7], backend=backend)
    ev.update({1: pred([xywh_to_xyxy(GT2), xywh_to_xyxy(GT1)], [0.3, 0.6], [1, 1])})
    stats = run_eval(ev)
    assert stats[0] == 1.0 and stats[1] == 1.0 and stats[8] == 1.0

    # A second image whose GT gets no detection must count as a miss: recall 1/2 -> AP = 51/101.
    anns = [{"image_id": 1, "category_id": 7, "bbox": GT1}, {"image_id": 2, "category_id": 7, "bbox": GT2}]
    coco2 = make_coco([(1, 480, 640), (2, 480, 640)], anns, [7])
    ev = CocoEvaluator(coco2, [7], backend=backend)
    ev.update({1: pred([xywh_to_xyxy(GT1)], [0.5], [0]), 2: pred([], [], [])})
    stats = run_eval(ev)
    assert abs(stats[1] - 51 / 101) < 1e-12 and stats[8] == 0.5
    # ... while an image never passed to update is not evaluated.
    ev = CocoEvaluator(coco2, [7], backend=backend)
    ev.update({1: pred([xywh_to_xyxy(GT1)], [0.5], [0])})
    assert run_eval(ev)[1] == pytest.approx(1.0, abs=1e-12)  # pycocotools: tp / (tp + fp + eps)


# --------------------------------------------------------------------------- (c) random data
def random_case(seed: int, crowd: bool):
    """~30 images, 3 classes, GT of all sizes, jittered and random detections; image 30 has no GT,
    image 29 gets no detections."""
    rng = np.random.default_rng(seed)
    cat_ids = [2, 5, 11]
    images, anns, dets = [], [], {}
    for img in range(1, 31):
        h, w = int(rng.integers(200, 700)), int(rng.integers(200, 700))
        images.append((img, h, w))
        n_gt = 0 if img == 30 else int(rng.integers(1, 7))
        for _ in range(n_gt):
            bw = float(rng.uniform(4, w / 2))
            bh = float(rng.uniform(4, h / 2))
            box = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh]
            iscrowd = int(crowd and rng.random() < 0.15)
            anns.append(
                {"image_id": img, "category_id": int(rng.choice(cat_ids)), "bbox": box, "iscrowd": iscrowd}
            )
        if img == 29:
            dets[img] = []
            continue
        rows = []
        for a in [a for a in anns if a["image_id"] == img]:
            for _ in range(int(rng.integers(0, 3))):
                x, y, bw, bh = a["bbox"]
                jit = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
                box = [x + jit[0], y + jit[1], max(bw + jit[2], 1.0), max(bh + jit[3], 1.0)]
                cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
                rows.append((box, float(rng.random()), cat))
        for _ in range(int(rng.integers(0, 6))):
            bw, bh = float(rng.uniform(2, w / 2)), float(rng.uniform(2, h / 2))
            rows.append(
                (
                    [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh],
                    float(rng.random()),
                    int(rng.choice(cat_ids)),
                )
            )
        dets[img] = rows
    return make_coco(images, anns, cat_ids), anns, dets, cat_ids


def to_predictions(dets, cat_ids) -> dict[int, dict[str, torch.Tensor]]:
    label = {c: i for i, c in enumerate(cat_ids)}
    out = {}
    for img, rows in dets.items():
        boxes = torch.tensor([xywh_to_xyxy(b) for b, _, _ in rows], dtype=torch.float64).reshape(-1, 4)
        out[img] = {
            "boxes": boxes,
            "scores": torch.tensor([s for _, s, _ in rows], dtype=torch.float64),
            "labels": torch.tensor([label[c] for _, _, c in rows], dtype=torch.int64),
        }
    return out


def test_random_ap50_matches_independent_reference() -> None:
    coco, anns, dets, cat_ids = random_case(seed=0, crowd=False)
    ev = CocoEvaluator(coco, cat_ids)
    ev.update(to_predictions(dets, cat_ids))
    stats = run_eval(ev)
    assert 0.05 < stats[1] < 0.95  # a non-trivial case
    assert abs(stats[1] - reference_ap50(anns, dets, list(range(1, 31)), cat_ids)) < 1e-12


def test_backends_agree_and_match_direct_pycocotools() -> None:
    coco, _, dets, cat_ids = random_case(seed=1, crowd=True)
    assert any(a["iscrowd"] for a in coco.dataset["annotations"])
    predictions = to_predictions(dets, cat_ids)
    results = {}
    for backend in BACKENDS:
        ev = CocoEvaluator(coco, cat_ids, backend=backend)
        ev.update(predictions)
        results[backend] = (run_eval(ev), ev.coco_eval.eval["precision"], ev.coco_eval.eval["recall"])
    s_ref, p_ref, r_ref = results["pycocotools"]
    assert len(s_ref) == 12 and min(s_ref[:3]) > 0.05
    for backend, (s_other, p_other, r_other) in results.items():
        np.testing.assert_allclose(s_other, s_ref, rtol=0, atol=1e-12, err_msg=backend)
        np.testing.assert_allclose(p_other, p_ref, rtol=0, atol=1e-12, err_msg=backend)
        np.testing.assert_allclose(r_other, r_ref, rtol=0, atol=1e-12, err_msg=backend)
        if backend in BIT_IDENTICAL:
            assert s_other == s_ref and np.array_equal(p_other, p_ref) and np.array_equal(r_other, r_ref), backend

    # Reference: plain pycocotools loadRes + COCOeval on a fresh copy of the ground truth.
    records = [
        {"image_id": img, "category_id": c, "bbox": [float(v) for v in b], "score": s}
        for img, rows in dets.items()
        for b, s, c in rows
    ]
    gt = COCO()
    gt.dataset = copy.deepcopy(coco.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ref = COCOeval(gt, gt.loadRes(records), iouType="bbox")
        ref.params.imgIds = sorted(dets)
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    np.testing.assert_allclose(s_ref, ref.stats, rtol=0, atol=1e-12)


@functools.cache
def synthetic_reference(score_levels: int) -> tuple[dict, dict, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A COCO-like synthetic set of 300 images (crowd boxes, images without annotations, images without
    detections, scores tied when ``score_levels`` > 0) and plain pycocotools' (stats, precision, recall)."""
    dataset, detections = synthetic_coco(num_images=300, seed=13, crowd_fraction=0.03, empty_fraction=0.05,
                                         detections_per_image=25, score_levels=score_levels)
    gt = coco_from_dataset(copy.deepcopy(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCOeval(gt, gt.loadRes(records(detections)), iouType="bbox")
        ref.params.imgIds = sorted(detections)
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    return dataset, detections, (np.asarray(ref.stats), ref.eval["precision"], ref.eval["recall"])


@pytest.mark.parametrize("score_levels", [0, 50])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gives_pycocotools_numbers_on_a_synthetic_coco_like_set(backend: str, score_levels: int) -> None:
    dataset, detections, (stats, precision, recall) = synthetic_reference(score_levels)
    annotations = dataset["annotations"]
    assert sum(a["iscrowd"] for a in annotations) >= 10
    assert len({a["image_id"] for a in annotations}) < len(dataset["images"])  # images without annotations
    assert sum(len(rows) == 0 for rows in detections.values()) >= 5  # images without detections
    assert 0.05 < stats[0] < 0.95 and (stats >= 0).all()

    cat_ids = [c["id"] for c in dataset["categories"]]
    to_label = {c: i for i, c in enumerate(cat_ids)}
    ev = CocoEvaluator(coco_from_dataset(dataset), cat_ids, backend=backend)
    ev.update({i: rows_to_predictions(rows, to_label) for i, rows in detections.items()})
    got = run_eval(ev)
    np.testing.assert_allclose(got, stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ev.coco_eval.eval["precision"], precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ev.coco_eval.eval["recall"], recall, rtol=0, atol=1e-12)
    if backend in BIT_IDENTICAL:  # the default backend is chosen on this: pycocotools' numbers bit for bit
        assert got == stats.tolist()
        assert np.array_equal(ev.coco_eval.eval["precision"], precision)
        assert np.array_equal(ev.coco_eval.eval["recall"], recall)


# --------------------------------------------------------------------------- (d) duplicates
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_image_counted_once(backend: str) -> None:
    coco = hand_coco()
    ev = CocoEvaluator(coco, [3, 7], backend=backend)
    first = pred([xywh_to_xyxy(GT1), xywh_to_xyxy(GT2)], [0.9, 0.8], [1, 1])
    ev.update({1: first})
    ev.update({1: first})  # e.g. DistributedSampler padding
    ev.update({1: pred([[0, 0, 5, 5]], [0.99], [1])})  # a later update of the same id is ignored too
    assert ev.num_detections == 2 and ev.img_ids == [1]
    assert run_eval(ev)[0] == 1.0  # double counting would turn the copies into false positives


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        coco, _, dets, cat_ids = random_case(seed=2, crowd=True)
        preds = to_predictions(dets, cat_ids)
        ids = sorted(preds)
        shard = ids[rank::world] + ([ids[0]] if rank == world - 1 else [])  # padding duplicate of image 1
        ev = CocoEvaluator(coco, cat_ids)
        ev.update({i: preds[i] for i in shard})
        ev.synchronize()
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"img_ids": ev.img_ids, "n": ev.num_detections, "stats": run_eval(ev)}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_synchronize_across_two_processes(tmp_path) -> None:
    torch.multiprocessing.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    coco, _, dets, cat_ids = random_case(seed=2, crowd=True)
    ev = CocoEvaluator(coco, cat_ids)
    ev.update(to_predictions(dets, cat_ids))
    expected = run_eval(ev)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["img_ids"] == list(range(1, 31)) and got["n"] == ev.num_detections
        assert got["stats"] == expected


# --------------------------------------------------------------------------- (e) empty
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_predictions_give_zeros(backend: str) -> None:
    ev = CocoEvaluator(hand_coco(), [3, 7], backend=backend)
    assert run_eval(ev) == [0.0] * 12 and ev.coco_eval is None
    ev.update({1: pred([], [], [])})
    assert run_eval(ev) == [0.0] * 12
    assert (ev.coco_eval.eval["precision"][:, :, 1, 0, 2] == 0).all()  # the GT class: precision 0


def test_dump_roundtrip_and_errors(tmp_path) -> None:
    coco, _, dets, cat_ids = random_case(seed=3, crowd=False)
    ev = CocoEvaluator(coco, cat_ids)
    ev.update(to_predictions(dets, cat_ids))
    stats = run_eval(ev)
    ev.dump(tmp_path / "res.json")
    records = json.loads((tmp_path / "res.json").read_text())
    assert len(records) == ev.num_detections and set(records[0]) == {
        "image_id",
        "category_id",
        "bbox",
        "score",
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), iouType="bbox")
        ref.params.imgIds = ev.img_ids
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    np.testing.assert_allclose(stats, ref.stats, rtol=0, atol=1e-12)

    with pytest.raises(KeyError, match="image_id 999"):
        ev.update({999: pred([], [], [])})
    with pytest.raises(ValueError, match="image_id 1: label outside"):
        CocoEvaluator(coco, cat_ids).update({1: pred([[0, 0, 1, 1]], [0.5], [3])})
    with pytest.raises(ValueError, match="absent from coco_gt"):
        CocoEvaluator(coco, [2, 4])
    with pytest.raises(ValueError, match="unknown backend"):
        CocoEvaluator(coco, cat_ids, backend="nope")


# --------------------------------------------------------------------------- (b) PostProcess
def _ref_box(cxcywh: torch.Tensor, h: float, w: float) -> list[float]:
    cx, cy, bw, bh = cxcywh.tolist()
    return [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]


def test_postprocess_softmax_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    B, Q, K = 3, 7, 5
    outputs = {
        "pred_logits": torch.randn(B, Q, K + 1, generator=g, dtype=torch.float64),
        "pred_boxes": torch.rand(B, Q, 4, generator=g, dtype=torch.float64),
    }
    sizes = torch.tensor([[480, 640], [100, 300], [333, 222]])
    res = PostProcess(sigmoid=False)(outputs, sizes)
    assert len(res) == B
    for b in range(B):
        h, w = sizes[b].tolist()
        assert res[b]["labels"].dtype == torch.int64 and res[b]["scores"].shape == (Q,)
        for q in range(Q):
            p = torch.exp(outputs["pred_logits"][b, q]) / torch.exp(outputs["pred_logits"][b, q]).sum()
            best = max(range(K), key=lambda k: p[k].item())
            assert res[b]["labels"][q].item() == best
            assert res[b]["scores"][q].item() == pytest.approx(p[best].item(), abs=1e-12)
            ref = _ref_box(outputs["pred_boxes"][b, q], h, w)
            assert res[b]["boxes"][q].tolist() == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("num_select", [10, 1000])
def test_postprocess_sigmoid_matches_loop(num_select: int) -> None:
    g = torch.Generator().manual_seed(1)
    B, Q, K = 2, 9, 4
    outputs = {
        "pred_logits": torch.randn(B, Q, K, generator=g, dtype=torch.float64),
        "pred_boxes": torch.rand(B, Q, 4, generator=g, dtype=torch.float64),
    }
    sizes = torch.tensor([[480, 640], [50, 70]])
    res = PostProcess(sigmoid=True, num_select=num_select)(outputs, sizes)
    for b in range(B):
        h, w = sizes[b].tolist()
        cands = [
            (1 / (1 + np.exp(-outputs["pred_logits"][b, q, k].item())), q, k)
            for q in range(Q)
            for k in range(K)
        ]
        cands.sort(key=lambda t: -t[0])
        cands = cands[:num_select]
        assert len(res[b]["scores"]) == len(cands) == min(num_select, Q * K)
        np.testing.assert_allclose(res[b]["scores"].numpy(), [c[0] for c in cands], rtol=0, atol=1e-12)
        assert res[b]["labels"].tolist() == [c[2] for c in cands]
        ref = [_ref_box(outputs["pred_boxes"][b, q], h, w) for _, q, _ in cands]
        np.testing.assert_allclose(res[b]["boxes"].numpy(), ref, rtol=0, atol=1e-9)


def test_postprocess_box_scaling_by_hand() -> None:
    boxes = torch.tensor([[[0.5, 0.25, 0.25, 0.125]], [[0.5, 0.5, 1.0, 1.0]]])  # exact in binary
    sizes = torch.tensor([[200, 400], [30, 50]])  # [h, w]
    for sigmoid, logits in ((False, torch.zeros(2, 1, 3)), (True, torch.zeros(2, 1, 2))):
        res = PostProcess(sigmoid=sigmoid, num_select=1)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
        assert res[0]["boxes"].tolist() == [[150.0, 37.5, 250.0, 62.5]]
        assert res[1]["boxes"].tolist() == [[0.0, 0.0, 50.0, 30.0]]
        assert res[0]["boxes"].dtype == torch.float32
    half = PostProcess(sigmoid=False)(
        {"pred_logits": torch.zeros(2, 1, 3, dtype=torch.float16), "pred_boxes": boxes.half()}, sizes
    )
    assert half[0]["boxes"].dtype == torch.float32 and half[0]["scores"].tolist() == [pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="orig_sizes"):
        PostProcess(sigmoid=False)({"pred_logits": torch.zeros(2, 1, 3), "pred_boxes": boxes}, sizes[:1])


def _greedy_nms_reference(scores: list[float], labels: list[int], boxes: list[list[float]], iou: float) -> list[int]:
    """Textbook greedy NMS, one class at a time: indices kept, in input order."""

    def overlap(a: list[float], b: list[float]) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(labels[j] != labels[i] or overlap(boxes[i], boxes[j]) <= iou for j in kept):
            kept.append(i)
    return sorted(kept)


@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("nms_iou", [0.3, 0.7])
def test_postprocess_nms_matches_greedy_reference(sigmoid: bool, nms_iou: float) -> None:
    """Duplicates (jittered copies of a few boxes, as a one-to-many-trained model predicts) are suppressed per
    image and class exactly as textbook greedy NMS does; without NMS nothing changes."""
    g = torch.Generator().manual_seed(7)
    B, Q, K = 3, 24, 3
    centres = torch.rand(B, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25
    boxes = centres.repeat_interleave(6, dim=1) + 0.04 * torch.randn(B, Q, 4, generator=g, dtype=torch.float64)
    boxes[..., 2:] = boxes[..., 2:].abs() * 0.5 + 0.05
    outputs = {
        "pred_logits": torch.randn(B, Q, K + (0 if sigmoid else 1), generator=g, dtype=torch.float64),
        "pred_boxes": boxes,
    }
    sizes = torch.tensor([[480, 640], [100, 300], [64, 64]])
    plain = PostProcess(sigmoid=sigmoid, num_select=30)(outputs, sizes)
    suppressed = PostProcess(sigmoid=sigmoid, num_select=30, nms_iou=nms_iou)(outputs, sizes)
    removed = 0
    for p, s in zip(plain, suppressed, strict=True):
        keep = _greedy_nms_reference(p["scores"].tolist(), p["labels"].tolist(), p["boxes"].tolist(), nms_iou)
        removed += len(p["scores"]) - len(keep)
        for key in ("scores", "labels", "boxes"):
            assert torch.equal(s[key], p[key][keep]), key
    assert removed > 0  # the case exercises suppression


def test_postprocess_nms_by_hand() -> None:
    """Same class and IoU 0.81 > 0.7: the lower score goes; another class, or IoU 0.64 <= 0.7, stays."""
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.45, 0.45], [0.5, 0.5, 0.4, 0.4],
                           [0.5, 0.5, 0.45, 0.45]]], dtype=torch.float64)
    logits = torch.tensor([[[4.0, -9.0], [3.0, -9.0], [2.0, -9.0], [-9.0, 1.0]]], dtype=torch.float64)
    res = PostProcess(sigmoid=True, num_select=4, nms_iou=0.7)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 100]])
    )[0]
    assert res["labels"].tolist() == [0, 0, 1]  # query 1 (IoU 0.81 with query 0) removed
    assert res["boxes"][:, 2].tolist() == pytest.approx([75.0, 70.0, 72.5])
    with pytest.raises(ValueError, match="nms_iou"):
        PostProcess(sigmoid=True, nms_iou=1.5)


# --------------------------------------------------------------------------- (f) unusual ground truth
# Annotation files from other tools: every backend either gives pycocotools' numbers on the same detections
# or fails when the evaluator's ground truth is prepared (start-up), naming the file and the field.
BASE_CATS = (1, 2, 3)


def unusual_base(seed: int) -> tuple[dict, dict[int, np.ndarray]]:
    """(COCO dataset: 16 images, 3 categories, boxes of every area range; detections per image as xyxy rows
    ``[x1, y1, x2, y2, score, category_id]``: jittered copies of the GT, some with another class, plus random
    boxes). Detections are made from the final category ids by :func:`unusual_case`."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], {}
    for img in range(1, 17):
        h, w = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        images.append({"id": img, "width": w, "height": h, "file_name": f"{img:04d}.jpg"})
        rows = []
        for _ in range(int(rng.integers(1, 7))):
            side = float(np.exp(rng.uniform(np.log(8), np.log(min(w, h) * 0.8))))  # small, medium and large
            bw, bh = side * float(rng.uniform(0.6, 1.4)), side * float(rng.uniform(0.6, 1.4))
            box = [float(rng.uniform(0, w - min(bw, w - 1))), float(rng.uniform(0, h - min(bh, h - 1))), bw, bh]
            cat = int(rng.choice(BASE_CATS))
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": box,
                         "area": bw * bh, "iscrowd": 0})
            for _ in range(int(rng.integers(0, 3))):
                j = rng.normal(0, 0.1, 4) * [bw, bh, bw, bh]
                x1, y1 = box[0] + j[0], box[1] + j[1]
                c = cat if rng.random() < 0.8 else int(rng.choice(BASE_CATS))
                rows.append([x1, y1, x1 + max(bw + j[2], 1.0), y1 + max(bh + j[3], 1.0), rng.random(), c])
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            rows.append([x1, y1, x1 + rng.uniform(4, w / 2), y1 + rng.uniform(4, h / 2), rng.random(),
                         int(rng.choice(BASE_CATS))])
        dets[img] = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    dataset = {"info": {"tool": "other"}, "images": images, "annotations": anns,
               "categories": [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in BASE_CATS]}
    return dataset, dets


def _rle_of_box(box: list[float], h: int, w: int) -> dict:
    from pycocotools import mask as mask_utils

    m = np.zeros((h, w), dtype=np.uint8, order="F")
    x, y, bw, bh = (int(round(v)) for v in box)
    m[y:y + bh, x:x + bw] = 1
    rle = mask_utils.encode(m)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def unusual_case(name: str, seed: int = 0) -> tuple[dict, dict | None, dict[int, np.ndarray]]:
    """(the file's dataset, what pycocotools is given as the reference: the same file, or None where
    pycocotools cannot evaluate the file itself, detections per image). The reference for None is the file
    with the documented defaults filled in (area w*h, iscrowd 0, ids 1..N), see :func:`documented_defaults`."""
    dataset, dets = unusual_base(seed)
    rng = np.random.default_rng(seed + 100)
    anns, images = dataset["annotations"], dataset["images"]
    size = {img["id"]: (img["height"], img["width"]) for img in images}
    parts = set(name.split("+"))
    everything = name == "everything"  # every case below at once, except the negative id
    remap: dict[int, int] = {}
    if "ids_from_7" in parts or everything:
        remap = {1: 7, 2: 19, 3: 40}
    if "background_0" in parts or everything:
        remap = {**{c: c for c in BASE_CATS}, **remap, BASE_CATS[0]: 0}  # class 1 becomes category 0
    if remap:
        for a in anns:
            a["category_id"] = remap.get(a["category_id"], a["category_id"])
        for rows in dets.values():
            rows[:, 5] = [remap.get(int(c), int(c)) for c in rows[:, 5]]
        dataset["categories"] = [{"id": remap.get(c, c), "name": f"class{c}"} for c in BASE_CATS]
        if 0 in remap.values():
            next(c for c in dataset["categories"] if c["id"] == 0)["name"] = "background"
    if "negative_id" in parts:
        for a in anns:
            if a["category_id"] == BASE_CATS[0]:
                a["category_id"] = -1
        for rows in dets.values():
            rows[rows[:, 5] == BASE_CATS[0], 5] = -1
        dataset["categories"][0]["id"] = -1
    if "empty_category" in parts or everything:
        dataset["categories"].append({"id": 55, "name": "never annotated"})
        for rows in dets.values():  # a few detections of it: false positives of a class without GT
            rows[rng.random(len(rows)) < 0.1, 5] = 55
    if "empty_images" in parts or everything:
        for img in (17, 18):
            images.append({"id": img, "width": 320, "height": 240, "file_name": f"{img:04d}.jpg"})
            dets[img] = np.asarray([[5.0, 6.0, 100.0, 90.0, 0.7, dataset["categories"][1]["id"]]])
        images.append({"id": 19, "width": 320, "height": 240, "file_name": "0019.jpg"})
        dets[19] = np.zeros((0, 6))
    if "crowd" in parts or everything:
        for a in anns:
            if rng.random() < 0.2:
                h, w = size[a["image_id"]]
                a["iscrowd"] = 1
                a["segmentation"] = _rle_of_box(a["bbox"], h, w)
                a["area"] = 0.7 * a["bbox"][2] * a["bbox"][3]  # a mask smaller than its box
    if "exterior" in parts or everything:
        for a in anns:
            if not a["iscrowd"]:
                x, y, w, h = a["bbox"]
                a["segmentation"] = [{"exterior": [[x, y], [x + w, y], [x + w, y + h], [x, y + h]],
                                      "interiors": []}]
    if "keypoints" in parts or everything:
        for a in anns:
            x, y, w, h = a["bbox"]
            a["keypoints"] = [x + w / 2, y + h / 2, 2, x, y, 1]
            a["num_keypoints"] = 2
    if "ignore" in parts or everything:
        for a in anns[::4]:
            a["ignore"] = 1  # pycocotools replaces it by iscrowd before use
    reference: dict | None = dataset
    if "no_area" in parts or everything:
        for a in anns[::2]:
            del a["area"]
        reference = None
    if "no_iscrowd" in parts or everything:
        for a in anns[1::2]:
            a.pop("iscrowd")
        reference = None
    if "id_0" in parts or everything:
        for k, a in enumerate(anns):
            a["id"] = k  # ids from 0; the first annotation also gets an exact, top-scoring detection
        x, y, w, h = anns[0]["bbox"]
        dets[anns[0]["image_id"]] = np.concatenate(
            [dets[anns[0]["image_id"]], [[x, y, x + w, y + h, 1.0, anns[0]["category_id"]]]])
        reference = None
    return dataset, reference, dets


def documented_defaults(dataset: dict) -> dict:
    """The file with what the evaluator fills in: ``area`` = w*h, ``iscrowd`` = 0 where missing, annotation
    ids 1..N in file order (the rest untouched: pycocotools ignores the other fields for boxes)."""
    out = copy.deepcopy(dataset)
    for k, a in enumerate(out["annotations"], start=1):
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        a.setdefault("iscrowd", 0)
        a["id"] = k
    return out


def pycocotools_reference(dataset: dict, dets: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Plain pycocotools on a copy of ``dataset``: (12 stats, precision array), all of ``dets``' images."""
    gt = coco_from_dataset(copy.deepcopy(dataset))
    recs = [{"image_id": img, "category_id": int(r[5]), "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]],
             "score": r[4]} for img in sorted(dets) for r in dets[img].tolist()]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(recs), iouType="bbox")
        ev.params.imgIds = sorted(dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev.eval["precision"]


UNUSUAL = ["ids_from_7", "background_0", "empty_category", "empty_images", "no_area", "no_iscrowd", "exterior",
           "keypoints", "crowd", "ignore", "id_0", "everything", "negative_id"]
# What a backend rejects at start-up (and must keep rejecting there, not later): hotcoco takes only
# non-negative category ids.
REJECTED = {("negative_id", "hotcoco"): "field 'category_id'"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", UNUSUAL)
def test_unusual_ground_truth_gives_pycocotools_numbers_or_fails_at_start_up(case: str, backend: str,
                                                                             tmp_path) -> None:
    dataset, reference, dets = unusual_case(case)
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(dataset))
    cat_ids = sorted(c["id"] for c in dataset["categories"])
    if (case, backend) in REJECTED:
        with pytest.raises(EvalGroundTruthError) as info:
            CocoEvaluator(path, cat_ids, backend=backend)
        message = str(info.value)
        assert str(path) in message and REJECTED[case, backend] in message, message
        assert "train.eval_backend=pycocotools" in message
        return
    if reference is None:  # pycocotools cannot evaluate the file itself (or miscounts ids of 0)
        reference = documented_defaults(dataset)
    stats, precision = pycocotools_reference(reference, dets)
    assert 0.05 < stats[0] < 0.95 and (stats[:3] > 0).all(), stats  # a non-trivial case

    ev = CocoEvaluator(path, cat_ids, backend=backend)
    label = {c: i for i, c in enumerate(cat_ids)}
    ev.update({img: {"boxes": torch.as_tensor(rows[:, :4]), "scores": torch.as_tensor(rows[:, 4]),
                     "labels": torch.as_tensor([label[int(c)] for c in rows[:, 5]], dtype=torch.int64)}
               for img, rows in dets.items()})
    got = run_eval(ev)
    np.testing.assert_allclose(got, stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ev.coco_eval.eval["precision"], precision, rtol=0, atol=1e-12)
    if backend in BIT_IDENTICAL:
        assert got == stats.tolist() and np.array_equal(ev.coco_eval.eval["precision"], precision)


def test_the_unusual_files_break_the_backends_when_given_as_they_are() -> None:
    """Why the evaluator sends a box-only copy: the raw files fail (hotcoco on ``exterior`` polygons,
    pycocotools without ``area`` or ``iscrowd``) or miscount (pycocotools on an annotation id 0)."""
    import hotcoco

    raw, _, _ = unusual_case("exterior")
    with pytest.raises(ValueError, match="segmentation"):
        hotcoco.COCO(raw)
    for case in ("no_area", "no_iscrowd"):
        raw, _, dets = unusual_case(case)
        with pytest.raises(KeyError):
            pycocotools_reference(raw, dets)
    raw, _, dets = unusual_case("id_0")
    assert pycocotools_reference(raw, dets)[0][0] < pycocotools_reference(documented_defaults(raw), dets)[0][0]


def test_box_dataset_sends_only_the_box_fields() -> None:
    raw, _, _ = unusual_case("everything")
    before = copy.deepcopy(raw)
    out = box_dataset(raw, "f.json")
    assert raw == before  # the input is not modified
    assert set(out) == {"images", "categories", "annotations"}
    assert [set(i) for i in out["images"]] == [{"id", "width", "height", "file_name"}] * len(raw["images"])
    assert [c["id"] for c in out["categories"]] == [0, 19, 40, 55] == [c["id"] for c in raw["categories"]]
    assert out["categories"][0] == {"id": 0, "name": "background"}
    assert len(out["annotations"]) == len(raw["annotations"])
    for k, (a, r) in enumerate(zip(out["annotations"], raw["annotations"], strict=True), start=1):
        assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
        assert a["id"] == k and (a["image_id"], a["category_id"], a["bbox"]) == (r["image_id"], r["category_id"],
                                                                                 r["bbox"])
        assert a["area"] == r.get("area", r["bbox"][2] * r["bbox"][3]) and a["iscrowd"] == r.get("iscrowd", 0)
    assert any("area" not in r for r in raw["annotations"]) and any("iscrowd" not in r for r in raw["annotations"])
    # A category without a name gets its id; non-string names and supercategories become strings.
    named = box_dataset({"images": [], "categories": [{"id": 4}, {"id": 5, "name": 5, "supercategory": 2}]})
    assert named["categories"] == [{"id": 4, "name": "4"}, {"id": 5, "name": "5", "supercategory": "2"}]


def _file(**changes) -> dict:
    dataset = {"images": [{"id": 1, "width": 10, "height": 10, "file_name": "a.jpg"}],
               "categories": [{"id": 1, "name": "a"}],
               "annotations": [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]}
    for key, value in changes.items():
        record, field = key.split("__")
        target = dataset[record][0] if record != "top" else dataset
        if value is None:
            target.pop(field)
        else:
            target[field] = value
    return dataset


@pytest.mark.parametrize("changes, expected", [
    ({"annotations__bbox": [1, 2, 3]}, r"annotations\[0\] \(annotation id 9, image id 1\): field 'bbox'"),
    ({"annotations__bbox": [1, 2, float("nan"), 3]}, r"annotations\[0\].*field 'bbox'"),
    ({"annotations__bbox": None}, r"annotations\[0\].*field 'bbox'"),
    ({"annotations__area": "big"}, r"annotations\[0\].*field 'area'"),
    ({"annotations__iscrowd": 2}, r"annotations\[0\].*field 'iscrowd'"),
    ({"annotations__image_id": 5}, r"annotations\[0\].*field 'image_id' 5"),
    ({"annotations__category_id": None}, r"annotations\[0\].*field 'category_id' None"),
    ({"images__id": "1"}, r"images\[0\]: field 'id' must be an integer, got '1'"),
    ({"categories__id": 1.0}, r"categories\[0\]: field 'id' must be an integer"),
    ({"top__categories": None}, r"field 'categories': expected a list"),
])
def test_malformed_ground_truth_is_named(changes: dict, expected: str) -> None:
    with pytest.raises(EvalGroundTruthError, match=r"^f\.json: " + expected):
        box_dataset(_file(**changes), "f.json")
    duplicated = _file()
    duplicated["images"].append(dict(duplicated["images"][0]))
    with pytest.raises(EvalGroundTruthError, match=r"f\.json: images\[1\]: duplicate image id 1"):
        box_dataset(duplicated, "f.json")


def test_rejection_names_the_record_of_the_file(tmp_path) -> None:
    """The backend's own message, plus what its record index is in the file (lists keep the file's order)."""
    dataset = _file()
    dataset["categories"].insert(0, {"id": -3, "name": "odd"})
    with pytest.raises(EvalGroundTruthError, match=r"'hotcoco' rejects the ground truth \(loading\).*"
                       r"categories\[0\] of the file is category id -3 \('odd'\).*train.eval_backend=pycocotools"):
        prepare_ground_truth(dataset, "hotcoco", source="odd.json")
    prepare_ground_truth(dataset, "pycocotools", source="odd.json")  # pycocotools takes it


class _FailsWhenEvaluating(PycocotoolsBackend):
    """A backend that loads the ground truth but rejects it when evaluating."""

    name = "fails_when_evaluating"

    def evaluate(self, gt: Any, detections: np.ndarray, img_ids: Sequence[int]) -> Any:
        raise RuntimeError("annotations[0]: field 'area': not accepted")


def test_a_backend_failing_only_in_evaluation_fails_at_preparation(monkeypatch) -> None:
    monkeypatch.setitem(EVAL_BACKENDS._entries, _FailsWhenEvaluating.name, _FailsWhenEvaluating)
    with pytest.raises(EvalGroundTruthError, match=r"^g\.json: .*'fails_when_evaluating' rejects the ground truth "
                       r"\(a trial evaluation of images \[1\]\).*annotations\[0\] of the file is annotation id 9"):
        CocoEvaluator(_file(), [1], backend=_FailsWhenEvaluating.name, source="g.json")


def test_prepared_ground_truth_is_reused_and_checked() -> None:
    coco = hand_coco()
    gt = prepare_ground_truth(coco, "hotcoco", source="hand.json")
    assert prepare_ground_truth(coco, "hotcoco") is gt  # cached per COCO object: built once per run
    ev = CocoEvaluator(gt, [3, 7], backend="hotcoco")
    assert ev.ground_truth is gt
    with pytest.raises(KeyError, match=r"image_id 5 is not in the ground truth \(hand\.json\)"):
        ev.update({5: pred([], [], [])})
    # Given to another backend, the prepared ground truth is prepared again for it.
    assert CocoEvaluator(gt, [3, 7], backend="pycocotools").ground_truth.backend_name == "pycocotools"


# --------------------------------------------------------------------------- (g) the trainer's start-up
def _shapes_copy(shapes_root: Path, tmp_path: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the session's tiny shapes dataset whose two annotation files went through ``change``."""
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        dataset = json.loads(path.read_text())
        change(dataset)
        path.write_text(json.dumps(dataset))
    return root


def _other_tool(dataset: dict) -> None:
    """What the reporting user's annotation tool writes: ``exterior`` polygons and keypoints."""
    for a in dataset["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [{"exterior": [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]}]
        a["keypoints"] = [x + w / 2, y + h / 2, 2]


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_evaluates_another_tools_file_as_pycocotools_does(shapes_root: Path, tmp_path: Path) -> None:
    root = _shapes_copy(shapes_root, tmp_path, _other_tool)
    stats = {}
    for backend in ("hotcoco", "pycocotools"):
        cfg = load_config(SHAPES_YAML, tiny_overrides(root, tmp_path / backend, f"train.eval_backend={backend}",
                                                      "train.max_iters_per_epoch=2", epochs=1))
        with contextlib.redirect_stdout(io.StringIO()):
            stats[backend] = run(cfg, progress=False)["test_coco_eval_bbox"]
    assert len(stats["hotcoco"]) == 12
    np.testing.assert_allclose(stats["hotcoco"], stats["pycocotools"], rtol=0, atol=1e-12)


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_fails_before_training_on_a_file_the_backend_rejects(shapes_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def negative_ids(dataset: dict) -> None:
        dataset["categories"][0]["id"] = -1
        for a in dataset["annotations"]:
            a["category_id"] = -1 if a["category_id"] == 1 else a["category_id"]

    root = _shapes_copy(shapes_root, tmp_path, negative_ids)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started before the evaluator's ground truth was checked")

    monkeypatch.setattr(trainer, "train_one_epoch", no_training)
    cfg = load_config(SHAPES_YAML, tiny_overrides(root, tmp_path / "run", "train.eval_backend=hotcoco", epochs=1))
    val_file = re.escape(str(root / "annotations" / "instances_val.json"))
    with pytest.raises(EvalGroundTruthError, match=rf"^{val_file}: .*'hotcoco'.*field 'category_id'.*"
                                                   r"train\.eval_backend=pycocotools"):
        run(cfg, progress=False)
