"""The DETR model's query types: the paper's learned queries and anchor queries refined layer by layer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHAPES_YAML

from detr_ot.build import build_model
from detr_ot.config import load_config
from detr_ot.data.collate import collate_batch
from detr_ot.models.transformer import feature_centres, gaussian_attention_bias, sine_box_embedding


def anchor_model(tiny, *overrides: str):  # noqa: ANN001, ANN201
    cfg = load_config(SHAPES_YAML, tiny("model.query_type=anchor", "model.dec_layers=3", *overrides))
    torch.manual_seed(0)
    return build_model(cfg, 3).eval()


def test_sine_box_embedding_matches_the_formula() -> None:
    boxes = torch.tensor([[0.1, 0.7, 0.25, 0.5]])
    d = 8
    emb = sine_box_embedding(boxes, d)
    assert emb.shape == (1, 4 * d)
    for c, v in enumerate(boxes[0].tolist()):
        expected = []
        for i in range(d // 2):
            angle = 2 * math.pi * v / 10000 ** (2 * i / d)
            expected += [math.sin(angle), math.cos(angle)]
        torch.testing.assert_close(emb[0, c * d:(c + 1) * d], torch.tensor(expected), rtol=0, atol=1e-6)


def test_untrained_anchor_model_predicts_its_anchors_at_every_layer(tiny) -> None:
    model = anchor_model(tiny)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool))
    anchors = model.anchors.weight.sigmoid()
    for boxes in [out["pred_boxes"]] + [aux["pred_boxes"] for aux in out["aux_outputs"]]:
        torch.testing.assert_close(boxes, anchors[None].expand(2, -1, -1), rtol=0, atol=1e-6)
    assert len(out["aux_outputs"]) == 2
    assert anchors[:, :2].min() >= 0.05 - 1e-6 and anchors[:, :2].max() <= 0.95 + 1e-6
    torch.testing.assert_close(anchors[:, 2:], torch.full_like(anchors[:, 2:], 0.25))


def test_each_layer_refines_the_previous_layers_box(tiny) -> None:
    """With the box head's last layer a constant shift b, layer l predicts sigmoid(logit(anchor) + l * b)."""
    model = anchor_model(tiny)
    shift = torch.tensor([0.2, -0.1, 0.3, -0.4])
    with torch.no_grad():
        model.bbox_embed.layers[-1].bias.copy_(shift)
        out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    per_layer = [aux["pred_boxes"] for aux in out["aux_outputs"]] + [out["pred_boxes"]]
    logit_anchor = model.anchors.weight.sigmoid().logit()
    for layer, boxes in enumerate(per_layer, start=1):
        torch.testing.assert_close(boxes[0], (logit_anchor + layer * shift).sigmoid(), rtol=0, atol=1e-5)


def test_refinement_detaches_the_anchor_between_layers(tiny) -> None:
    """A loss on the first layer's box alone reaches the anchors; one on the last layer's box reaches them
    only through the cross-attention positions, not through the chain of boxes (DAB-DETR's stop-gradient)."""
    model = anchor_model(tiny).train()
    out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    grad_first = torch.autograd.grad(out["aux_outputs"][0]["pred_boxes"].sum(), model.anchors.weight,
                                     retain_graph=True)[0]
    assert grad_first.abs().sum() > 0
    # Zero box-head weights: the last box depends on the anchor only through the detached chain.
    grad_last = torch.autograd.grad(out["pred_boxes"].sum(), model.anchors.weight, allow_unused=True)[0]
    assert grad_last is None or grad_last.abs().sum() == 0


def test_feature_centres_are_relative_to_the_unpadded_region() -> None:
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 2:] = True  # valid region: 3 rows x 2 columns
    centres = feature_centres(mask).reshape(3, 4, 2)
    torch.testing.assert_close(centres[1, 0], torch.tensor([0.25, 0.5]))  # row 1, column 0
    torch.testing.assert_close(centres[2, 1], torch.tensor([0.75, 2.5 / 3]))
    assert centres[0, 3, 0] > 1  # padded column


def test_gaussian_attention_bias_by_hand() -> None:
    anchors = torch.tensor([[[0.5, 0.5, 0.4, 0.2]]])  # (1, 1, 4)
    centres = torch.tensor([[[0.5, 0.5], [0.7, 0.5], [0.5, 0.6], [0.9, 0.9]]])
    pad = torch.tensor([[False, False, False, True]])
    bias = gaussian_attention_bias(anchors, centres, pad, sigma=0.5, nhead=2)
    # std_x = 0.5 * 0.4 = 0.2, std_y = 0.5 * 0.2 = 0.1: dx = 0.2 -> -0.5, dy = 0.1 -> -0.5
    expected = torch.tensor([0.0, -0.5, -0.5, float("-inf")])
    assert bias.shape == (2, 1, 4)
    for head in range(2):
        torch.testing.assert_close(bias[head, 0], expected)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_anchor_outputs_do_not_depend_on_batch_companions(tiny, sigma: float) -> None:
    model = anchor_model(tiny, f"model.anchor_sigma={sigma}")
    torch.manual_seed(1)
    small, large = torch.randn(3, 97, 65), torch.randn(3, 150, 170)
    alone_images, alone_mask, _ = collate_batch([(small, {})])
    batch_images, batch_mask, _ = collate_batch([(large, {}), (small, {})])
    with torch.no_grad():
        alone = model(alone_images, alone_mask)
        together = model(batch_images, batch_mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(together[key][1], alone[key][0], rtol=0, atol=1e-5)


def test_unknown_query_type_is_rejected(tiny) -> None:
    cfg = load_config(SHAPES_YAML, tiny("model.query_type=grid"))
    with pytest.raises(ValueError, match="model.query_type='grid'"):
        build_model(cfg, 3)
