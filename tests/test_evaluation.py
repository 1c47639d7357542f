"""CocoEvaluator and PostProcess against hand-worked values, an independent numpy COCO-AP50 reference,
direct pycocotools calls, and the faster_coco_eval and hotcoco backends."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ot.evaluation import CocoEvaluator
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
