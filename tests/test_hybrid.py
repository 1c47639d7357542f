"""Hybrid matching (Jia et al., "DETRs with Hybrid Matching", CVPR 2023) and one-to-many plans in the criterion.

1. The query groups: the one-to-one queries compute what they compute without the extra group (the mask
   works; without it they do not), and inference ignores the group.
2. The normaliser (objects | positives): hand-worked examples, hard and soft plans.
3. The duplication identity, an independent reference for every classification loss: a hard plan giving ground
   truth j two queries, normalised by positives, has exactly the losses and gradients of a one-to-one plan on
   the target list where j appears twice.
4. The hybrid criterion's keys and total, and one training step of the hybrid model for several matchers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES_YAML

from detr_ot.build import build_classification_loss, build_criterion, build_model, build_optimizer
from detr_ot.config import ConfigError, load_config
from detr_ot.losses.criterion import SetCriterion
from detr_ot.losses.hybrid import HybridCriterion
from detr_ot.losses.ranking_cls import APLoss
from detr_ot.matching import Assignment, CostWeights, Matcher, PaddedTargets, PairwiseTerms
from detr_ot.models.query_groups import QueryGroups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["model.hidden_dim=32", "model.nheads=4", "model.dim_feedforward=64", "model.enc_layers=1",
         "model.dec_layers=2", "model.num_queries=6", "model.dropout=0.0", "model.tiny_widths=[8,16,32,64]"]


DEFORMABLE = ["model.arch=deformable", "model.num_feature_levels=3", "model.enc_points=2", "model.dec_points=2",
              "model.tiny_widths=[8,16,16,32]"]
# The models with query groups: DETR (learned and anchor queries), Deformable DETR (two-stage: the group takes
# the next proposals; single-stage: its own anchors; mixed query selection: its own static content queries).
MODELS = {
    "detr-learned": ["model.query_type=learned"],
    "detr-anchor": ["model.query_type=anchor"],
    "deformable-two_stage": DEFORMABLE,
    "deformable-single_stage": [*DEFORMABLE, "model.two_stage=false"],
    "deformable-mixed": [*DEFORMABLE, "model.mixed_query_selection=true", "model.look_forward_twice=true"],
}


def config(*overrides: str):  # noqa: ANN201
    return load_config(SHAPES_YAML, [*SMALL, *overrides])


def images(batch: int = 2, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images with the second one padded on the right and bottom."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 64, 80, generator=gen, dtype=dtype)
    mask = torch.zeros(batch, 64, 80, dtype=torch.bool)
    mask[1:, 48:, :] = True
    mask[1:, :, 56:] = True
    return x.masked_fill(mask[:, None], 0.0), mask


TARGETS = [
    {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]), "labels": torch.tensor([0, 2]),
     "image_id": 1},
    {"boxes": torch.tensor([[0.4, 0.5, 0.4, 0.3]]), "labels": torch.tensor([1]), "image_id": 2},
]


# ----------------------------------------------------------------------------------------------------------
# 1. Query groups


def test_self_attention_mask_is_block_diagonal() -> None:
    groups = QueryGroups(2, 3)
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert torch.equal(groups.self_attn_mask(5, "cpu"), expected.bool())
    assert groups.self_attn_mask(2, "cpu") is None
    assert groups.active(True) == 5 and groups.active(False) == 2
    with pytest.raises(ValueError, match="4 queries decoded"):
        groups.self_attn_mask(4, "cpu")
    with pytest.raises(ValueError, match="hybrid.num_queries"):
        QueryGroups(2, -1)


def model_pair(model: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(hybrid model with 9 one-to-many queries, plain model), same seed, float64, the parameters they share
    equal and perturbed alike (so that zero-initialised box heads hide nothing)."""
    torch.manual_seed(0)
    hybrid = build_model(config(*MODELS[model], "hybrid.num_queries=9"), 3).double()
    torch.manual_seed(0)
    plain = build_model(config(*MODELS[model]), 3).double()
    extra = set(hybrid.state_dict()) - set(plain.state_dict())
    assert all("_o2m" in key for key in extra), extra  # none in two-stage: its references are proposals
    shared = dict(hybrid.named_parameters())
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for key, value in plain.state_dict().items():  # created last: the rest is initialised as without them
            assert torch.equal(hybrid.state_dict()[key], value), key
        for name, param in plain.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.1
            param.add_(noise)
            shared[name].add_(noise)
    return hybrid, plain


def flat(outputs: dict) -> list[torch.Tensor]:
    layers = [outputs, *outputs.get("aux_outputs", [])] + ([outputs["enc_outputs"]] if "enc_outputs" in outputs else [])
    return [t for layer in layers for t in (layer["pred_logits"], layer["pred_boxes"])]


@pytest.mark.parametrize("model", list(MODELS))
def test_one_to_one_queries_ignore_the_extra_group(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train mode, float64. With the block-diagonal mask the one-to-one outputs of every layer (and the
    two-stage encoder outputs) are the plain model's. Not bit for bit: the masked keys add exact zeros to the
    softmax sums, but attention and linear kernels over 15 instead of 6 queries may sum in another order
    (float64 rounding, ~1e-16)."""
    hybrid, plain = model_pair(model)
    x, mask = images(dtype=torch.float64)
    hybrid.train(), plain.train()
    with torch.no_grad():
        got, expected = hybrid(x, mask), plain(x, mask)
        extra = got["one_to_many"]
        assert extra["pred_logits"].shape == (2, 9, 3) and len(extra["aux_outputs"]) == 1
        assert "enc_outputs" not in extra
        for a, b in zip(flat(got), flat(expected), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        # The check can fail: without the mask the groups attend to each other and the outputs move.
        monkeypatch.setattr(QueryGroups, "self_attn_mask", lambda self, total, device: None)
        unmasked = hybrid(x, mask)
    worst = max(float((a - b).abs().max()) for a, b in zip(flat(unmasked), flat(expected), strict=True))
    assert worst > 1e-3, worst


@pytest.mark.parametrize("model", list(MODELS))
def test_inference_uses_the_one_to_one_queries_only(model: str) -> None:
    hybrid, plain = model_pair(model)
    x, mask = images(dtype=torch.float64)
    hybrid.eval(), plain.eval()
    with torch.no_grad():
        got, expected = hybrid(x, mask), plain(x, mask)
    assert set(got) == set(expected) and "one_to_many" not in got
    assert got["pred_logits"].shape == (2, 6, 3)
    for a, b in zip(flat(got), flat(expected), strict=True):
        assert torch.equal(a, b)  # the same computation on the same parameters


# ----------------------------------------------------------------------------------------------------------
# 2. Normalisers


class FixedPlan(Matcher):
    """A matcher that returns a given plan (B x Q x (M+1)), to test the criterion on chosen plans."""

    def __init__(self, plan: torch.Tensor, hard: bool) -> None:
        super().__init__(CostWeights(1.0, 5.0, 2.0))
        self.plan, self.hard = plan, hard

    def forward(self, terms: PairwiseTerms) -> Assignment:
        assert self.plan.shape == (*terms.shape[:2], terms.shape[2] + 1)
        return Assignment(self.plan, terms.gt_mask, self.hard)


def criterion(cls: str, plan: torch.Tensor, normalizer: str, hard: bool = True) -> SetCriterion:
    cfg = load_config(None, [f"loss.cls={cls}"])
    class_cost = "prob" if cls == "ce" else "focal"
    return SetCriterion(FixedPlan(plan, hard), build_classification_loss(cfg), 3, class_cost, normalizer=normalizer)


def plan_from_rows(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)


def test_normalizers_by_hand() -> None:
    """One image, ground truths A (0.3,0.3,.2,.2) and B (0.7,0.7,.2,.2); queries at L1 distances 0.1 and 0.05
    from A, 0.1 and 0 from B, and a fifth far away. Box loss = sum_ij S_ij L1_ij / Z.
    Hard k=2 plan (q0,q1 -> A; q2,q3 -> B): sum = 0.25; objects Z = 2 -> 0.125; positives Z = 4 -> 0.0625.
    Soft plan (0.5, 0.25 of q0, q1 on A; 0.5, 0.25 of q2, q3 on B; the rest background): sum = 0.5*0.1 +
    0.25*0.05 + 0.5*0.1 = 0.1125; objects -> 0.05625; positives Z = 1.5 -> 0.075.
    Focal classification divides by the same Z: positives / objects = 2 / 4 (hard)."""
    target = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]), "labels": torch.tensor([0, 1]),
               "image_id": 1}]
    boxes = torch.tensor([[[0.4, 0.3, 0.2, 0.2], [0.3, 0.35, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2],
                           [0.7, 0.7, 0.2, 0.2], [0.1, 0.9, 0.1, 0.1]]])
    outputs = {"pred_logits": torch.linspace(-2, 2, 15).reshape(1, 5, 3), "pred_boxes": boxes}
    hard = plan_from_rows([[0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])
    soft = plan_from_rows([[0.5, 0.5, 0], [0.75, 0.25, 0], [0.5, 0, 0.5], [0.75, 0, 0.25], [1, 0, 0]])
    cases = [(hard, True, "objects", 0.125), (hard, True, "positives", 0.0625),
             (soft, False, "objects", 0.05625), (soft, False, "positives", 0.075)]
    results = {}
    for plan, is_hard, normalizer, expected in cases:
        out = criterion("focal", plan, normalizer, is_hard)(outputs, target)
        assert float(out["loss_bbox"]) == pytest.approx(expected, rel=1e-6), (normalizer, is_hard)
        results[(is_hard, normalizer)] = out
    ratio = float(results[(True, "positives")]["loss_cls"]) / float(results[(True, "objects")]["loss_cls"])
    assert ratio == pytest.approx(0.5, rel=1e-6)


def test_positives_normalizer_without_objects_is_one() -> None:
    """No ground truth anywhere: Z = max(0, 1) = 1, as DETR's box count."""
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 1}]
    plan = torch.zeros(1, 4, 1)
    plan[..., 0] = 1
    logits = torch.randn(1, 4, 3)
    out = criterion("focal", plan, "positives")({"pred_logits": logits, "pred_boxes": torch.rand(1, 4, 4)}, empty)
    ref = criterion("focal", plan, "objects")({"pred_logits": logits, "pred_boxes": torch.rand(1, 4, 4)}, empty)
    assert float(out["loss_cls"]) == float(ref["loss_cls"]) > 0


def test_one_to_one_positives_equal_objects() -> None:
    """Hungarian matches every ground truth once: both normalisers give the same losses."""
    cfg = config("loss.cls=focal")
    gen = torch.Generator().manual_seed(2)
    outputs = {"pred_logits": torch.randn(2, 6, 3, generator=gen), "pred_boxes": torch.rand(2, 6, 4, generator=gen)}
    crit_objects = build_criterion(cfg, 3)
    crit_positives = build_criterion(config("loss.cls=focal", "loss.normalizer=positives"), 3)
    assert crit_positives.normalizer == "positives"
    a, b = crit_objects(outputs, TARGETS), crit_positives(outputs, TARGETS)
    assert a.keys() == b.keys()
    for key in a:
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key


# ----------------------------------------------------------------------------------------------------------
# 3. The duplication identity


def duplication_problem(cls: str) -> tuple[dict, list[dict], list[dict], torch.Tensor, torch.Tensor]:
    """(outputs, targets, targets with every ground truth listed twice, one-to-many plan with two queries per
    ground truth, the one-to-one plan on the duplicated list that gives the same queries to the copies)."""
    gen = torch.Generator().manual_seed(7)
    counts, queries, num_classes = [3, 0, 2], 10, 3
    k = num_classes + 1 if cls == "ce" else num_classes
    outputs = {"pred_logits": (torch.randn(3, queries, k, generator=gen) * 2).requires_grad_(True),
               "pred_boxes": (torch.rand(3, queries, 4, generator=gen) * 0.5 + 0.25).requires_grad_(True)}
    targets, doubled = [], []
    o2m = torch.zeros(3, queries, max(counts) + 1)
    o2o = torch.zeros(3, queries, 2 * max(counts) + 1)
    o2m[..., 0] = o2o[..., 0] = 1
    for b, n in enumerate(counts):
        xy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        boxes, labels = torch.cat([xy, wh], 1), torch.randint(num_classes, (n,), generator=gen)
        targets.append({"boxes": boxes, "labels": labels, "image_id": b})
        doubled.append({"boxes": boxes.repeat_interleave(2, 0), "labels": labels.repeat_interleave(2),
                        "image_id": b})
        chosen = torch.randperm(queries, generator=gen)[: 2 * n]
        for copy, q in enumerate(chosen.tolist()):  # queries chosen[2j], chosen[2j+1] -> ground truth j
            o2m[b, q, 0] = o2o[b, q, 0] = 0
            o2m[b, q, 1 + copy // 2] = 1
            o2o[b, q, 1 + copy] = 1
    return outputs, targets, doubled, o2m, o2o


def grads(outputs: dict, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [outputs["pred_logits"], outputs["pred_boxes"]]))


@pytest.mark.parametrize("cls", ["ce", "focal", "ap", "alrp", "rs"])
def test_one_to_many_plan_equals_one_to_one_plan_on_duplicated_targets(cls: str) -> None:
    outputs, targets, doubled, o2m, o2o = duplication_problem(cls)
    got = criterion(cls, o2m, "positives")(outputs, targets)
    expected = criterion(cls, o2o, "objects")(outputs, doubled)
    for key in ("loss", "loss_cls", "loss_bbox", "loss_giou", "class_error"):
        value = float(got[key].detach())
        assert torch.isfinite(got[key]) and value == pytest.approx(float(expected[key].detach()), rel=1e-5), key
    assert float(expected["loss_bbox"].detach()) > 0 and float(expected["loss_cls"].detach()) > 0
    for g, e in zip(grads(outputs, got["loss"]), grads(outputs, expected["loss"]), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * float(e.abs().max()))
    # The identity needs the positives normaliser: objects divides the box terms by 5 instead of 10
    # (unless the loss sets its own box weights, RS and aLRP).
    objects = criterion(cls, o2m, "objects")(outputs, targets)
    if cls in ("ce", "focal", "ap"):
        assert float(objects["loss_bbox"].detach()) == pytest.approx(2 * float(got["loss_bbox"].detach()), rel=1e-5)


def test_ranking_positives_with_several_queries_per_ground_truth() -> None:
    """Hard k=2 plan: both queries of a ground truth are positives at its class. Soft plan: each query's
    largest column decides (q2's is the background)."""
    padded = PaddedTargets.from_list([{"boxes": torch.rand(2, 4), "labels": torch.tensor([2, 0])}], "cpu")
    logits = torch.zeros(1, 5, 3)
    hard = plan_from_rows([[0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]])
    soft = plan_from_rows([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    expected = torch.zeros(1, 5, 3, dtype=torch.bool)
    expected[0, [0, 1], 2] = True
    expected[0, [3, 4], 0] = True
    for plan, hard_flag in ((hard, True), (soft, False)):
        pos, b, q, g = APLoss().positives(logits, Assignment(plan, padded.mask, hard_flag), padded)
        assert torch.equal(pos, expected), hard_flag
        assert q.tolist() == [0, 1, 3, 4] and g.tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------------------
# 4. The hybrid criterion and training steps


def test_hybrid_criterion_keys_and_total() -> None:
    cfg = config("loss.cls=focal", "hybrid.num_queries=9", "hybrid.k=3", "hybrid.loss_weight=0.5")
    torch.manual_seed(0)
    model, crit = build_model(cfg, 3), build_criterion(cfg, 3)
    assert isinstance(crit, HybridCriterion) and crit.one_to_many.normalizer == "positives"
    with torch.no_grad():
        outputs = model(*images())
        result = crit(outputs, TARGETS)
        main = crit.main(outputs, TARGETS)
        branch = crit.one_to_many(outputs["one_to_many"], TARGETS)
    terms = {k for k in main if k.startswith("loss_")}
    assert terms == {f"loss_{t}{s}" for t in ("cls", "bbox", "giou") for s in ("", "_0")}
    assert set(result) == set(main) | {k + "_o2m" for k in terms} | {"loss_o2m"}
    for key in terms:
        assert float(result[key]) == pytest.approx(float(main[key]), rel=1e-6)
        assert float(result[key + "_o2m"]) == pytest.approx(float(branch[key]), rel=1e-6)
    total = float(main["loss"]) + 0.5 * float(branch["loss"])
    assert float(result["loss"]) == pytest.approx(total, rel=1e-6)
    # The branch's plan: every ground truth takes k = 3 of the 9 extra queries.
    padded = PaddedTargets.from_list(TARGETS, "cpu")
    _, assignment = crit.one_to_many.match(outputs["one_to_many"], padded)
    assert assignment.to_gt.sum(1).tolist() == [[3.0, 3.0], [3.0, 0.0]]
    # Eval: the model computes no extra group and the criterion reports the main branch; training without
    # the group is a configuration error.
    model.eval(), crit.eval()
    with torch.no_grad():
        assert set(crit(model(*images()), TARGETS)) == set(main)
    crit.train()
    with pytest.raises(ValueError, match="one_to_many"):
        crit({k: v for k, v in outputs.items() if k != "one_to_many"}, TARGETS)


@pytest.mark.parametrize("overrides", [
    ["matcher.name=hungarian"],
    ["matcher.name=sinkhorn"],
    ["matcher.name=sinkhorn", "hybrid.matcher=sinkhorn", "loss.cls=ce"],
    ["matcher.name=hungarian", "model.query_type=learned", "loss.cls=rs"],
    [*DEFORMABLE, "matcher.name=hungarian"],
    [*DEFORMABLE, "matcher.name=sinkhorn", "model.two_stage=false"],
], ids=["hungarian", "sinkhorn", "sinkhorn-o2m-sinkhorn-ce", "learned-rs", "deformable-hungarian",
        "deformable-single_stage-sinkhorn"])
def test_one_training_step_with_hybrid_matching(overrides: list[str]) -> None:
    cfg = config("hybrid.num_queries=12", "hybrid.k=2", *overrides)
    torch.manual_seed(0)
    model, crit = build_model(cfg, 3), build_criterion(cfg, 3)
    optimizer = build_optimizer(cfg, model)
    model.train(), crit.train()
    result = crit(model(*images()), TARGETS)
    assert all(torch.isfinite(v).all() for v in result.values())
    assert "loss_cls_o2m" in result and "loss_giou_0_o2m" in result
    if "loss_cls_enc" in result:
        assert "loss_cls_enc_o2m" not in result  # the encoder proposals are supervised once, one-to-one
    params = [p for p in model.parameters() if p.requires_grad]
    branch = torch.autograd.grad(result["loss_o2m"], params, retain_graph=True, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in branch if g is not None) > 0  # the branch reaches the model
    optimizer.zero_grad()
    result["loss"].backward()
    # Its own queries train (two-stage without static content queries has none: its references are proposals).
    extra = [p for n, p in model.named_parameters() if "_o2m" in n]
    for param in extra:
        assert param.grad is not None and float(param.grad.abs().sum()) > 0
    before = [p.detach().clone() for p in extra]
    optimizer.step()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, extra, strict=True))


def test_hybrid_config() -> None:
    cfg = config("hybrid.num_queries=12", "hybrid.matcher=sinkhorn", "hybrid.k=4", "hybrid.sinkhorn.epsilon=0.1")
    options = cfg.hybrid.options["sinkhorn"]
    assert (options.supply, options.k, options.epsilon) == ("fixed", 4, 0.1)  # the dumped config says so
    assert config("hybrid.num_queries=12", "hybrid.one_to_many.supply=dynamic").hybrid.options[
        "one_to_many"].supply == "dynamic"
    assert "one_to_many" not in config().hybrid.options  # off: nothing built, nothing recorded
    for bad, message in [("hybrid.matcher=hungarian", "no one-to-many supply"),
                         ("hybrid.one_to_many.k=3", "set k once"),
                         ("loss.normalizer=boxes", "loss.normalizer"),
                         ("hybrid.k=0", "k=0")]:
        with pytest.raises(ConfigError, match=message):
            config("hybrid.num_queries=12", bad)
