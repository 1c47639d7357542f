"""Builders: config -> model, criterion, optimizer, LR schedule. The registries do the dispatch."""

from __future__ import annotations

import torch
from torch import nn

from detr_ot.config import Config, hybrid_matcher_options
from detr_ot.losses import CLASSIFICATION_LOSSES, ClassificationLoss
from detr_ot.losses.classification import CrossEntropyLoss, FocalLoss
from detr_ot.losses.criterion import SetCriterion
from detr_ot.losses.hybrid import HybridCriterion
from detr_ot.matching import MATCHERS, CostWeights, Matcher
from detr_ot.models import DETR, DeformableDETR, PostProcess, Transformer, build_backbone


def head_type(cfg: Config) -> str:
    """``softmax`` or ``sigmoid``: explicit ``model.head``, else what the classification loss needs."""
    if cfg.model.head != "auto":
        return cfg.model.head
    return CLASSIFICATION_LOSSES.get(cfg.loss.cls).head


def _build_detr(cfg: Config, num_classes: int) -> DETR:
    m = cfg.model
    backbone = build_backbone(m.backbone, m.pretrained, m.backbone_weights, tiny_widths=tuple(m.tiny_widths))
    transformer = Transformer(m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward, m.dropout)
    return DETR(
        backbone, transformer, num_classes, m.num_queries, m.aux_loss,
        sigmoid=head_type(cfg) == "sigmoid", query_type=m.query_type, anchor_sigma=m.anchor_sigma,
        num_queries_o2m=cfg.hybrid.num_queries,
    )


def _build_deformable(cfg: Config, num_classes: int) -> DeformableDETR:
    m = cfg.model
    if m.num_feature_levels < 1:
        raise ValueError(f"model.num_feature_levels={m.num_feature_levels} must be >= 1")
    levels = min(m.num_feature_levels, 3)  # C3-C5 at most; the rest are extra stride-2 levels
    backbone = build_backbone(m.backbone, m.pretrained, m.backbone_weights, tiny_widths=tuple(m.tiny_widths),
                              levels=levels)
    return DeformableDETR(
        backbone, num_classes, m.num_queries, m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers,
        m.dim_feedforward, m.dropout, m.num_feature_levels, m.enc_points, m.dec_points, m.two_stage,
        m.box_refine, m.mixed_query_selection, m.look_forward_twice, m.aux_loss,
        sigmoid=head_type(cfg) == "sigmoid", num_queries_o2m=cfg.hybrid.num_queries,
    )


MODELS = {"detr": _build_detr, "deformable": _build_deformable}  # model.arch -> builder


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The detector ``model.arch`` (every one returns the same outputs dict)."""
    if cfg.model.arch not in MODELS:
        raise ValueError(f"model.arch={cfg.model.arch!r}: choose one of {sorted(MODELS)}")
    return MODELS[cfg.model.arch](cfg, num_classes)


def _options(registry, name: str, given: dict):  # noqa: ANN001, ANN202
    opt_cls = registry.options(name)
    if opt_cls is None:
        return None
    return given.get(name, opt_cls())


def build_classification_loss(cfg: Config) -> ClassificationLoss:
    """The loss ``loss.cls`` with its arguments from the config: cross-entropy ``loss.eos_coef``, focal
    ``loss.focal_alpha`` and ``loss.focal_gamma``; any other registered loss its options (``loss.<name>.<key>``)
    and, if it re-weights the box losses (RS, aLRP), the criterion's ``loss.bbox_weight`` and ``loss.giou_weight``."""
    c = cfg.loss
    if c.cls == "ce":
        return CrossEntropyLoss(c.eos_coef)
    if c.cls == "focal":
        return FocalLoss(c.focal_alpha, c.focal_gamma)
    loss_cls = CLASSIFICATION_LOSSES.get(c.cls)
    args = (c.bbox_weight, c.giou_weight) if loss_cls.reweights_boxes else ()
    options = _options(CLASSIFICATION_LOSSES, c.cls, c.options)
    return loss_cls(*args) if options is None else loss_cls(*args, options=options)


def build_criterion(cfg: Config, num_classes: int) -> SetCriterion | HybridCriterion:
    """The set criterion of ``matcher`` and ``loss``; with ``hybrid.num_queries`` > 0 a
    :class:`HybridCriterion` adding the one-to-many branch (``hybrid.matcher`` with ``hybrid.k``, the same
    costs and losses, normalised by ``hybrid.normalizer``, weighted by ``hybrid.loss_weight``)."""
    weights = CostWeights(cfg.matcher.cost_class, cfg.matcher.cost_bbox, cfg.matcher.cost_giou)
    loss_cls = CLASSIFICATION_LOSSES.get(cfg.loss.cls)
    class_cost = cfg.matcher.class_cost
    if class_cost == "auto":
        class_cost = loss_cls.class_cost if head_type(cfg) == loss_cls.head else (
            "prob" if head_type(cfg) == "softmax" else "focal"
        )

    def criterion(matcher: Matcher, normalizer: str) -> SetCriterion:
        return SetCriterion(matcher, build_classification_loss(cfg), num_classes, class_cost, cfg.loss.cls_weight,
                            cfg.loss.bbox_weight, cfg.loss.giou_weight, normalizer)

    matcher = MATCHERS.build(cfg.matcher.name, weights, _options(MATCHERS, cfg.matcher.name, cfg.matcher.options))
    main = criterion(matcher, cfg.loss.normalizer)
    h = cfg.hybrid
    if h.num_queries == 0:
        return main
    branch = criterion(MATCHERS.build(h.matcher, weights, hybrid_matcher_options(h)), h.normalizer)
    return HybridCriterion(main, branch, h.loss_weight)


def build_postprocess(cfg: Config) -> PostProcess:
    return PostProcess(sigmoid=head_type(cfg) == "sigmoid", num_select=cfg.model.num_select,
                       nms_iou=cfg.model.nms_iou)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with a separate backbone learning rate (DETR's recipe) and, where the model has them, the
    deformable attention's sampling offsets and reference-point layers at ``optim.lr_linear_proj_mult``
    times the base rate (Zhu et al., Deformable DETR, ICLR 2021, sec. 5 "Implementation Details")."""

    def linear_proj(name: str) -> bool:
        return any(part in ("sampling_offsets", "reference_points") for part in name.split("."))

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if n.startswith("backbone.")]
    proj = [p for n, p in named if not n.startswith("backbone.") and linear_proj(n)]
    rest = [p for n, p in named if not n.startswith("backbone.") and not linear_proj(n)]
    groups = [{"params": rest, "lr": cfg.optim.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.optim.lr_backbone})
    if proj:
        groups.append({"params": proj, "lr": cfg.optim.lr * cfg.optim.lr_linear_proj_mult})
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Step drops at the epochs in ``optim.lr_drop`` (stepped once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.optim.lr_drop), gamma=cfg.optim.gamma)
