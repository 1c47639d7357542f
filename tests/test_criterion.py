"""Set criterion: a hand-computed example, and L(S) over the Assignment equals DETR's index-based loss on
every decoder layer (cross-entropy and focal heads)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from detr_ot.build import build_criterion
from detr_ot.config import load_config


def make_criterion(cls: str, num_classes: int, aux: bool = True):  # noqa: ANN201
    cfg = load_config(None, [f"loss.cls={cls}", f"model.aux_loss={str(aux).lower()}"])
    return build_criterion(cfg, num_classes)


def test_hand_computed_example() -> None:
    """One ground truth (class 0, box (.5,.5,.2,.2)); query 0 predicts p=.75 for class 0 and box
    (.5,.5,.2,.3); query 1 predicts p=.5 and a far box.
    CE = (-ln .75 - .1 ln .5) / (1 + .1); L1 = .1; GIoU = (.04/.06) -> loss 1/3; total = CE + 5 L1 + 2/3."""
    crit = make_criterion("ce", num_classes=1)
    outputs = {
        "pred_logits": torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]]]),
    }
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([0]), "image_id": 1}]
    out = crit(outputs, targets)
    ce = (-math.log(0.75) - 0.1 * math.log(0.5)) / 1.1
    assert float(out["loss_cls"]) == pytest.approx(ce, abs=1e-6)
    assert float(out["loss_bbox"]) == pytest.approx(0.1, abs=1e-6)
    assert float(out["loss_giou"]) == pytest.approx(1 / 3, abs=1e-6)
    assert float(out["loss"]) == pytest.approx(ce + 0.5 + 2 / 3, abs=1e-6)
    assert float(out["class_error"]) == pytest.approx(0.0)
    # query 0 says "object", query 1 is a tie broken towards class 0 (argmax of [0, 0] is 0): 2 vs 1 target
    assert float(out["cardinality_error"]) == pytest.approx(1.0)


def detr_reference(outputs: dict, targets: list[dict], pairs, num_classes: int, cls: str) -> dict[str, float]:  # noqa: ANN001
    """DETR's loss written the index way (facebookresearch/detr SetCriterion, re-derived): one matched
    (query, gt) list per image."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    b_idx, q_idx, g_idx = pairs
    tgt_labels = torch.stack([targets[b]["labels"][g] for b, g in zip(b_idx.tolist(), g_idx.tolist(), strict=True)])
    tgt_boxes = torch.stack([targets[b]["boxes"][g] for b, g in zip(b_idx.tolist(), g_idx.tolist(), strict=True)])
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    if cls == "ce":
        target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long)
        target_classes[b_idx, q_idx] = tgt_labels
        weight = torch.ones(num_classes + 1)
        weight[-1] = 0.1
        loss_cls = F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
    else:
        onehot = torch.zeros_like(logits)
        onehot[b_idx, q_idx, tgt_labels] = 1
        loss_cls = sigmoid_focal_loss(logits, onehot, 0.25, 2.0, reduction="sum") / num_boxes
    src = boxes[b_idx, q_idx]
    l1 = (src - tgt_boxes).abs().sum() / num_boxes
    giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")))
    return {"loss_cls": float(loss_cls), "loss_bbox": float(l1), "loss_giou": float((1 - giou).sum() / num_boxes)}


@pytest.mark.parametrize("cls", ["ce", "focal"])
def test_assignment_loss_equals_index_loss_on_every_layer(cls: str) -> None:
    gen = torch.Generator().manual_seed(3)
    num_classes, queries, counts = 4, 9, [3, 0, 5]
    k = num_classes + 1 if cls == "ce" else num_classes

    def layer() -> dict:
        return {"pred_logits": torch.randn(3, queries, k, generator=gen) * 2,
                "pred_boxes": torch.rand(3, queries, 4, generator=gen) * 0.5 + 0.25}

    outputs = layer()
    outputs["aux_outputs"] = [layer(), layer()]
    targets = []
    for i, n in enumerate(counts):
        xy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"boxes": torch.cat([xy, wh], 1), "labels": torch.randint(num_classes, (n,), generator=gen),
                        "image_id": i})
    crit = make_criterion(cls, num_classes)
    result = crit(outputs, targets)
    from detr_ot.matching import PaddedTargets, compute_pairwise_terms

    padded = PaddedTargets.from_list(targets, "cpu")
    total = 0.0
    for layer_out, suffix in [(outputs, "")] + [(a, f"_{i}") for i, a in enumerate(outputs["aux_outputs"])]:
        terms = compute_pairwise_terms(layer_out["pred_logits"], layer_out["pred_boxes"], padded, crit.class_cost)
        pairs = crit.matcher(terms).matched_pairs()
        assert len(pairs[0]) == sum(counts)  # every ground truth matched on every layer
        ref = detr_reference(layer_out, targets, pairs, num_classes, cls)
        for name, value in ref.items():
            assert float(result[name + suffix]) == pytest.approx(value, abs=1e-6), name + suffix
        total += ref["loss_cls"] + 5 * ref["loss_bbox"] + 2 * ref["loss_giou"]
    assert float(result["loss"]) == pytest.approx(total, abs=1e-5)


def test_loss_is_differentiable_and_zero_target_batch() -> None:
    crit = make_criterion("ce", num_classes=2, aux=False)
    logits = torch.randn(2, 5, 3, requires_grad=True)
    boxes = torch.rand(2, 5, 4).mul(0.5).add(0.25).requires_grad_(True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": i} for i in range(2)]
    out = crit({"pred_logits": logits, "pred_boxes": boxes}, empty)
    assert float(out["loss_bbox"].detach()) == 0.0 and float(out["loss_giou"].detach()) == 0.0
    out["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
