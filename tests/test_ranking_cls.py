"""Ranking losses as DETR classification losses: positives from the Assignment, box re-weighting, the aLRP
self-balance state in checkpoints, and a few epochs of training each."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHAPES_YAML, read_log

from detr_ot.build import build_criterion
from detr_ot.config import load_config
from detr_ot.engine.checkpoint import load_checkpoint
from detr_ot.engine.trainer import run
from detr_ot.losses import ranking

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(gen: torch.Generator) -> tuple[dict, list[dict]]:
    logits = torch.randn(2, 6, 3, generator=gen, requires_grad=True)
    boxes = (torch.rand(2, 6, 4, generator=gen) * 0.4 + 0.3).requires_grad_(True)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]), "labels": torch.tensor([0, 2]),
         "image_id": 1},
        {"boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]]), "labels": torch.tensor([1]), "image_id": 2},
    ]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("cls", ["ap", "rs", "alrp"])
def test_classification_term_is_the_ranking_loss_of_the_matched_positives(cls: str) -> None:
    gen = torch.Generator().manual_seed(0)
    outputs, targets = batch(gen)
    crit = build_criterion(load_config(None, [f"loss.cls={cls}", f"loss.{cls}.aux_focal=0"]), 3)
    out = crit(outputs, targets)
    from detr_ot.matching import PaddedTargets, compute_pairwise_terms

    padded = PaddedTargets.from_list(targets, "cpu")
    terms = compute_pairwise_terms(outputs["pred_logits"], outputs["pred_boxes"], padded, crit.class_cost)
    b, q, g = crit.matcher(terms).matched_pairs()
    pos = torch.zeros(2, 6, 3, dtype=torch.bool)
    pos[b, q, padded.labels[b, g]] = True
    logits = outputs["pred_logits"].reshape(1, -1)
    if cls == "ap":
        expected = ranking.ap_loss(logits, pos.reshape(1, -1), 1.0)
    elif cls == "rs":
        expected = ranking.rs_loss(logits, pos.reshape(1, -1), terms.iou[b, q, g].detach(), 0.5)
    else:
        expected, _ = ranking.alrp_loss(logits, pos.reshape(1, -1), ((1 - terms.giou[b, q, g]) / 2).detach(), 1.0)
    assert float(out["loss_cls"].detach()) == pytest.approx(float(expected.detach()), abs=1e-6)
    out["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0 and outputs["pred_boxes"].grad.abs().sum() > 0


@pytest.mark.parametrize("box_scale", [1.0, 3.0])
def test_rs_box_losses_are_balanced_by_value(box_scale: float) -> None:
    """RS: w_bbox * loss_bbox + w_giou * loss_giou equals box_scale times the RS loss value (balance by value)."""
    gen = torch.Generator().manual_seed(1)
    outputs, targets = batch(gen)
    cfg = load_config(None, ["loss.cls=rs", "loss.rs.aux_focal=0", "model.aux_loss=false",
                             f"loss.rs.box_scale={box_scale}"])
    out = {k: v.detach() for k, v in build_criterion(cfg, 3)(outputs, targets).items()}
    box = cfg.loss.bbox_weight * out["loss_bbox"] + cfg.loss.giou_weight * out["loss_giou"]
    assert float(out["loss_cls"]) > 0.1
    assert float(box) == pytest.approx(box_scale * float(out["loss_cls"]), rel=1e-5)


def test_alrp_self_balance_in_state_dict() -> None:
    crit = build_criterion(load_config(None, ["loss.cls=alrp", "loss.alrp.sb_period=2"]), 3)
    crit.train()
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        outputs, targets = batch(gen)
        crit(outputs, targets)
    weight = crit.cls_loss.balance.weight
    assert weight != 50.0  # re-estimated after `period` updates
    fresh = build_criterion(load_config(None, ["loss.cls=alrp", "loss.alrp.sb_period=2"]), 3)
    fresh.load_state_dict(crit.state_dict())
    assert fresh.cls_loss.balance.weight == weight


@pytest.mark.parametrize("cls", ["ap", "alrp", "rs"])
def test_ranking_loss_trains(cls: str, tiny) -> None:  # noqa: ANN001
    cfg = load_config(SHAPES_YAML, tiny(f"loss.cls={cls}", "loss.alrp.sb_period=5" if cls == "alrp" else "seed=0",
                                        epochs=3))
    run(cfg, progress=False)
    log = read_log(cfg.output_dir)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert all(math.isfinite(v) for r in log for v in r.values() if isinstance(v, float))
    assert log[-1]["train_loss_cls"] < log[0]["train_loss_cls"]
    if cls == "alrp":  # the self-balance weight is restored from the checkpoint
        state = load_checkpoint(cfg.output_dir + "/checkpoint.pth")["criterion"]
        assert any(k.endswith("_extra_state") for k in state)
