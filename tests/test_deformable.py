"""The Deformable DETR family (detr_ot/models/deformable.py): outputs contract, masked GroupNorm, two-stage
proposals and selection, where box-refinement gradients flow, padding invariance (also of DETR), every
matcher x classification loss on one training step, and a short run through the engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, SHAPES_YAML, read_log
from torch import nn

from detr_ot.build import build_criterion, build_model, build_optimizer
from detr_ot.config import load_config
from detr_ot.data.collate import collate_batch
from detr_ot.engine.trainer import run
from detr_ot.models.deformable import DeformableDETR, MaskedGroupNorm, _halve_mask

DEFORMABLE_YAML = CONFIGS / "shapes_deformable.yaml"
R50_YAML = CONFIGS / "deformable_r50_coco.yaml"

# A model small enough for one training step in well under a second (2 images of 64 px).
TINY = [
    "model.tiny_widths=[8,16,16,32]",
    "model.hidden_dim=32",
    "model.nheads=4",
    "model.dim_feedforward=32",
    "model.enc_layers=1",
    "model.dec_layers=3",
    "model.num_queries=6",
    "model.num_feature_levels=3",
    "model.enc_points=2",
    "model.dec_points=2",
    "device=cpu",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def deformable(*overrides: str, num_classes: int = 3) -> DeformableDETR:
    cfg = load_config(DEFORMABLE_YAML, [*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes)
    assert isinstance(model, DeformableDETR)
    return model


def perturb(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Random changes to every parameter, so zero-initialised heads (box deltas at zero) do not hide anything."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def images(b: int = 2, h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    return torch.randn(b, 3, h, w), torch.zeros(b, h, w, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------
# pieces


def test_masked_group_norm_equals_group_norm_of_the_unpadded_image() -> None:
    """Reference: nn.GroupNorm applied to each image cropped to its valid region."""
    torch.manual_seed(0)
    norm = MaskedGroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    reference = nn.GroupNorm(4, 8).double()
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64) * 3 + 1
    mask = torch.zeros(2, 7, 9, dtype=torch.bool)
    mask[0, 5:] = True
    mask[0, :, 6:] = True  # image 0: 5 x 6 valid, image 1: unpadded
    y = norm(x, mask)
    torch.testing.assert_close(y[0, :, :5, :6], reference(x[:1, :, :5, :6])[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(y[1], reference(x[1:])[0], rtol=0, atol=1e-12)
    assert (y[0][:, mask[0]] == 0).all()  # padding is zero (what the next conv should see)
    assert not torch.allclose(reference(x[:1])[0, :, :5, :6], y[0, :, :5, :6])  # plain GroupNorm would differ


def test_halve_mask_has_ceil_semantics() -> None:
    mask = torch.ones(2, 6, 8, dtype=torch.bool)
    mask[0, :5, :7] = False  # 5 x 7 valid -> 3 x 4
    mask[1, :6, :2] = False  # 6 x 2 valid -> 3 x 1
    half = _halve_mask(mask, (3, 4))
    assert (~half[0]).sum() == 12 and (~half[0]).all()
    assert (~half[1]).sum() == 3 and (~half[1, :, 0]).all()


def test_proposals_by_hand() -> None:
    model = deformable()
    mask0 = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask0[0, :, 2:] = True  # level 0: 4 rows x 2 valid columns
    mask1 = torch.zeros(1, 2, 2, dtype=torch.bool)
    props, valid = model.proposals([mask0, mask1], torch.float64)
    assert props.shape == (1, 16 + 4, 4) and valid.shape == (1, 20)
    # level 0, row 1, column 1: centre ((1 + 0.5) / 2, (1 + 0.5) / 4), side 0.05
    torch.testing.assert_close(props[0, 1 * 4 + 1], torch.tensor([0.75, 0.375, 0.05, 0.05], dtype=torch.float64))
    # level 1, cell (1, 0): centre (0.25, 0.75), side 0.1
    torch.testing.assert_close(props[0, 16 + 2], torch.tensor([0.25, 0.75, 0.1, 0.1], dtype=torch.float64))
    expected = ~mask0.flatten(1)
    assert torch.equal(valid[0, :16], expected[0])
    assert valid[0, 16:].all()
    wide = torch.zeros(1, 1, 60, dtype=torch.bool)  # one row: centre y = 0.5, x from 1/120: first cell < 0.01
    _, valid_wide = model.proposals([wide], torch.float64)
    assert not valid_wide[0, 0] and valid_wide[0, 1:-1].all() and not valid_wide[0, -1]


# ----------------------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("variant", ["two_stage", "single_stage", "softmax", "mixed_lft", "no_refine", "extra_level"])
def test_outputs_contract(variant: str) -> None:
    overrides = {
        "two_stage": [],
        "single_stage": ["model.two_stage=false"],
        "softmax": ["loss.cls=ce"],
        "mixed_lft": ["model.mixed_query_selection=true", "model.look_forward_twice=true"],
        "no_refine": ["model.box_refine=false"],
        "extra_level": ["model.num_feature_levels=5"],
    }[variant]
    model = perturb(deformable(*overrides))
    x, mask = images(2, 64, 80)
    mask[1, 40:] = True
    out = model(x, mask)
    k = 4 if variant == "softmax" else 3
    assert out["pred_logits"].shape == (2, 6, k)
    assert out["pred_boxes"].shape == (2, 6, 4)
    assert len(out["aux_outputs"]) == 2
    layers = [out, *out["aux_outputs"]]
    if variant != "single_stage":
        assert out["enc_outputs"]["pred_logits"].shape == (2, 6, k)
        layers.append(out["enc_outputs"])
    else:
        assert "enc_outputs" not in out
    for layer in layers:
        assert layer["pred_boxes"].shape == (2, 6, 4)
        assert (layer["pred_boxes"] >= 0).all() and (layer["pred_boxes"] <= 1).all()
        assert torch.isfinite(layer["pred_logits"]).all()
    if variant == "extra_level":
        assert len(model.input_proj) == 5 and model.input_proj[-1].conv.stride == (2, 2)


def test_untrained_predictions_are_the_references() -> None:
    """Box heads start at zero: every decoder layer predicts its reference, the encoder its proposal, and
    the decoder's references are the selected proposals (Zhu et al., 2021, App. A.4)."""
    model = deformable()
    x, mask = images()
    with torch.no_grad():
        out = model(x, mask)
    enc = out["enc_outputs"]["pred_boxes"]
    for layer in [out, *out["aux_outputs"]]:
        torch.testing.assert_close(layer["pred_boxes"], enc, rtol=0, atol=1e-6)
    sides = enc[..., 2:]
    assert all(any(math.isclose(s, 0.05 * 2**lvl, rel_tol=1e-4) for lvl in range(3)) for s in sides.flatten().tolist())


def test_two_stage_selects_the_top_scoring_valid_cells() -> None:
    """enc_outputs holds the Q cells with the highest best-class logit among the valid ones (brute force)."""
    model = perturb(deformable())
    captured = {}
    model.enc_class_embed.register_forward_hook(lambda m, i, o: captured.setdefault("logits", o))
    x, mask = images(2, 64, 80)
    mask[0, :, 48:] = True
    with torch.no_grad():
        out = model(x, mask)
        _, masks = model.pyramid(x, mask)
        _, valid = model.proposals(masks, torch.float32)
    logits = captured["logits"]
    for b in range(2):
        scores = [(float(logits[b, s].max()), s) for s in range(logits.shape[1]) if valid[b, s]]
        top = sorted(scores, reverse=True)[:6]
        selected = out["enc_outputs"]["pred_logits"][b]
        torch.testing.assert_close(selected.amax(-1), torch.tensor([t[0] for t in top]), rtol=0, atol=0)
        for (_, s), row in zip(top, selected, strict=True):
            torch.testing.assert_close(row, logits[b, s], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# gradients


def grad_sum(loss: torch.Tensor, module: nn.Module) -> float:
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(sum(g.abs().sum() for g in grads if g is not None))


def test_selected_references_are_detached_from_the_encoder_box_head() -> None:
    model = perturb(deformable()).train()
    x, mask = images()
    out = model(x, mask)
    decoder_loss = out["pred_boxes"].sum() + sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
    decoder_loss = decoder_loss + out["pred_logits"].sum()
    assert grad_sum(decoder_loss, model.enc_bbox_embed) == 0  # only through the detached references
    assert grad_sum(decoder_loss, model.encoder) > 0  # the decoder does read the encoder memory
    assert grad_sum(out["enc_outputs"]["pred_boxes"].sum(), model.enc_bbox_embed) > 0
    assert grad_sum(out["enc_outputs"]["pred_logits"].sum(), model.enc_class_embed) > 0


@pytest.mark.parametrize("look_forward_twice", [False, True])
def test_box_refinement_gradients(look_forward_twice: bool) -> None:
    """Layer i's box loss reaches its own box head; layer i-1's only with look forward twice (Zhang et al.,
    DINO, ICLR 2023, sec. 3.4); layer i-2's never."""
    model = perturb(deformable(f"model.look_forward_twice={str(look_forward_twice).lower()}")).train()
    x, mask = images()
    out = model(x, mask)
    boxes = [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]
    for i in (1, 2):
        loss = boxes[i].sum()
        assert grad_sum(loss, model.bbox_embed[i]) > 0
        assert (grad_sum(loss, model.bbox_embed[i - 1]) > 0) == look_forward_twice
        if i == 2:
            assert grad_sum(loss, model.bbox_embed[0]) == 0
    # forward values do not depend on the option (train mode: BatchNorm uses the batch's statistics)
    plain = perturb(deformable()).train()
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask)["pred_boxes"], plain(x, mask)["pred_boxes"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# padding invariance


def _alone_and_batched(model: nn.Module) -> tuple[dict, dict]:
    torch.manual_seed(1)
    small = torch.randn(3, 97, 65, dtype=torch.float64)
    large = torch.randn(3, 150, 170, dtype=torch.float64)
    alone_images, alone_mask, _ = collate_batch([(small, {})])
    batch_images, batch_mask, _ = collate_batch([(large, {}), (small, {})])
    assert batch_mask[1].any()  # the small image is padded in both directions
    with torch.no_grad():
        return model(alone_images, alone_mask), model(batch_images, batch_mask)


def _assert_same_image_outputs(alone: dict, together: dict) -> None:
    layers = [(alone, together)] + list(zip(alone.get("aux_outputs", []), together.get("aux_outputs", []),
                                            strict=True))
    if "enc_outputs" in alone:
        layers.append((alone["enc_outputs"], together["enc_outputs"]))
    for a, t in layers:
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(t[key][1], a[key][0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", ["two_stage", "single_stage", "mixed_lft", "extra_levels"])
def test_deformable_outputs_do_not_depend_on_batch_companions(variant: str) -> None:
    overrides = {
        "two_stage": [],
        "single_stage": ["model.two_stage=false"],
        "mixed_lft": ["model.mixed_query_selection=true", "model.look_forward_twice=true"],
        "extra_levels": ["model.num_feature_levels=5", "model.num_queries=20"],
    }[variant]
    model = perturb(deformable(*overrides)).double().eval()
    alone, together = _alone_and_batched(model)
    _assert_same_image_outputs(alone, together)


@pytest.mark.parametrize("query_type", ["learned", "anchor"])
def test_detr_outputs_do_not_depend_on_batch_companions(query_type: str) -> None:
    cfg = load_config(SHAPES_YAML, ["model.arch=detr", f"model.query_type={query_type}", "model.hidden_dim=32",
                                    "model.nheads=4", "model.dim_feedforward=32", "model.num_queries=6",
                                    "model.tiny_widths=[8,16,16,32]", "device=cpu"])
    torch.manual_seed(0)
    model = perturb(build_model(cfg, 3)).double().eval()
    alone, together = _alone_and_batched(model)
    _assert_same_image_outputs(alone, together)


def test_plain_group_norm_would_break_padding_invariance() -> None:
    """The invariance test can fail: with nn.GroupNorm's statistics over the padded map it does."""
    model = perturb(deformable()).double().eval()
    for proj in model.input_proj:
        plain = nn.GroupNorm(proj.norm.num_groups, proj.norm.num_channels).double()
        proj.norm.forward = lambda x, mask, plain=plain: plain(x)  # type: ignore[method-assign]
    alone, together = _alone_and_batched(model)
    with pytest.raises(AssertionError):
        _assert_same_image_outputs(alone, together)


# ----------------------------------------------------------------------------------------------------------
# training: every matcher x classification loss, the optimizer groups, the engine


MATCHERS = {
    "hungarian": ["matcher.name=hungarian"],
    "sinkhorn-soft-unrolled": ["matcher.name=sinkhorn", "matcher.sinkhorn.iters=10"],
    "sinkhorn-hard-straight-through": ["matcher.name=sinkhorn", "matcher.sinkhorn.iters=10",
                                       "matcher.sinkhorn.mode=hard", "matcher.sinkhorn.gradient=straight_through"],
    "sinkhorn-hard-detached": ["matcher.name=sinkhorn", "matcher.sinkhorn.iters=10", "matcher.sinkhorn.mode=hard",
                               "matcher.sinkhorn.gradient=detached"],
    "gu-identity": ["matcher.name=gu", "matcher.gu.target=identity"],
    "gu-blackbox": ["matcher.name=gu", "matcher.gu.target=blackbox"],
    "gu-perturbed": ["matcher.name=gu", "matcher.gu.target=perturbed", "matcher.gu.samples=2"],
}
LOSSES = ["ce", "focal", "ap", "alrp", "rs"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("matcher", sorted(MATCHERS))
def test_one_training_step(matcher: str, loss: str) -> None:
    cfg = load_config(DEFORMABLE_YAML, [*TINY, *MATCHERS[matcher], f"loss.cls={loss}"])
    torch.manual_seed(0)
    model = build_model(cfg, 3).train()
    criterion = build_criterion(cfg, 3).train()
    optimizer = build_optimizer(cfg, model)
    x, mask = images()
    mask[1, 48:] = True
    targets = [
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[0.5, 0.4, 0.4, 0.4]]), "labels": torch.tensor([1])},
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = criterion(model(x, mask), targets)
    assert torch.isfinite(losses["loss"]) and "loss_cls_enc" in losses and "loss_giou_enc" in losses
    optimizer.zero_grad()
    losses["loss"].backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name in ("class_embed.2.weight", "bbox_embed.2.layers.2.weight", "enc_class_embed.weight",
                 "enc_bbox_embed.layers.2.weight", "encoder.0.self_attn.value_proj.weight", "backbone.body.0.weight"):
        assert name in moved, f"{name} did not move"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_optimizer_gives_sampling_offsets_the_lower_learning_rate() -> None:
    cfg = load_config(R50_YAML, [*TINY, "model.backbone=tiny", "model.pretrained=false"])
    model = build_model(cfg, 3)
    optimizer = build_optimizer(cfg, model)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if "sampling_offsets" in name:
            assert lrs[id(p)] == pytest.approx(2e-4 * 0.1)
        elif name.startswith("backbone."):
            assert lrs[id(p)] == pytest.approx(2e-5)
        else:
            assert lrs[id(p)] == pytest.approx(2e-4), name
    assert len(lrs) == sum(1 for _ in model.parameters())
    detr = build_model(load_config(SHAPES_YAML, ["model.arch=detr"]), 3)
    assert len(build_optimizer(load_config(SHAPES_YAML), detr).param_groups) == 2  # no such parameters


def test_presets_load() -> None:
    r50 = load_config(R50_YAML)
    m = r50.model
    assert (m.arch, m.num_feature_levels, m.num_queries, m.dim_feedforward, m.two_stage, m.box_refine) == (
        "deformable", 4, 300, 1024, True, True)
    assert (r50.optim.lr, r50.optim.lr_drop, r50.train.epochs, r50.loss.cls) == (2e-4, [11], 12, "focal")
    tiny = load_config(DEFORMABLE_YAML)
    assert tiny.model.arch == "deformable" and tiny.model.backbone == "tiny"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.arch=deformabel"], "model.arch='deformabel'"),
        (["model.two_stage=false", "model.mixed_query_selection=true"], "mixed_query_selection"),
        (["model.box_refine=false", "model.look_forward_twice=true"], "look_forward_twice"),
        (["model.num_feature_levels=2", "model.tiny_widths=[8,16,16,32]"], None),
        (["model.num_queries=400"], "fewer than model.num_queries=400"),
        (["model.num_feature_levels=0"], "model.num_feature_levels=0 must be >= 1"),
        (["model.enc_points=0"], "n_points=0"),
    ],
)
def test_bad_settings_are_named(overrides: list[str], message: str | None) -> None:
    cfg = load_config(DEFORMABLE_YAML, [*TINY, *overrides])
    if message is None:  # a valid setting: fewer levels than the backbone has
        build_model(cfg, 3)(*images())
        return
    with pytest.raises(ValueError, match=message):
        build_model(cfg, 3)(*images())


def test_one_epoch_through_the_engine(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = load_config(DEFORMABLE_YAML, tiny(
        "model.arch=deformable", "model.num_feature_levels=3", "model.dec_layers=2", "model.enc_points=2",
        "model.dec_points=2", epochs=1,
    ))
    run(cfg, progress=False)
    log = read_log(cfg.output_dir)
    assert [r["epoch"] for r in log] == [0]
    assert math.isfinite(log[0]["train_loss"])
    assert "train_loss_cls_enc" in log[0]
    assert all(math.isfinite(v) for k, v in log[0].items() if isinstance(v, float) and "AP" not in k)


def test_losses_see_float32_on_every_layer_under_autocast() -> None:
    """The trainer casts every nested layer (aux_outputs and enc_outputs) to float32 before the criterion."""
    from detr_ot.engine.trainer import _float_outputs

    model = deformable().to(torch.bfloat16)
    x, mask = images()
    with torch.no_grad():
        out = _float_outputs(model(x.to(torch.bfloat16), mask))
    layers = [out, *out["aux_outputs"], out["enc_outputs"]]
    assert all(layer[k].dtype == torch.float32 for layer in layers for k in ("pred_logits", "pred_boxes"))
