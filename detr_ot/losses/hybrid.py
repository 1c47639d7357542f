"""The hybrid criterion: the one-to-one set criterion plus a one-to-many branch on an extra query group.

Hybrid matching (Jia, Yuan, He, Wu, Yu, Lin, Sun, Zhang, Hu, "DETRs with Hybrid Matching", CVPR 2023, sec. 3.2,
eqs. 4-6): ``L = L_one2one(P_main, G) + lambda * L_one2many(P_extra, G repeated k times)``. The one-to-many
branch is not a new loss: it is a second :class:`~detr_ot.losses.criterion.SetCriterion` (same loss code, same
weights) whose matcher gives ground truth j a column mass ``k_j`` (``supply=fixed, k`` is H-DETR's repetition;
:mod:`detr_ot.matching.supply`), applied to the model's ``outputs["one_to_many"]``
(:mod:`detr_ot.models.query_groups`). The main branch may use any matcher.

Logged keys: the main criterion's, plus every unweighted term of the branch with the suffix ``_o2m``
(``loss_cls_o2m``, ``loss_bbox_0_o2m``, ...) and ``loss_o2m``, the branch's weighted total; ``loss`` is
``loss_main + loss_weight * loss_o2m``. The branch's logging metrics (class and cardinality error) are left
out: its queries are not used at inference. In eval mode the model computes no extra group; the criterion then
returns the main branch alone.
"""

from __future__ import annotations

import torch
from torch import nn

from detr_ot.losses.classification import ClassificationLoss
from detr_ot.losses.criterion import SetCriterion
from detr_ot.matching import Matcher
from detr_ot.models.query_groups import ONE_TO_MANY

SUFFIX = "_o2m"
_METRICS = ("class_error", "cardinality_error")


def _float(outputs: dict) -> dict:
    """The branch's outputs in float32 (the engine casts the main outputs; losses are computed in fp32)."""
    out = {k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}
    if "aux_outputs" in outputs:
        out["aux_outputs"] = [_float(a) for a in outputs["aux_outputs"]]
    return out


class HybridCriterion(nn.Module):
    """``main`` on the one-to-one outputs, ``one_to_many`` (a SetCriterion with a one-to-many matcher) on
    ``outputs["one_to_many"]``, its total weighted by ``loss_weight`` (H-DETR's lambda, 1 by default).

    The engine sees the main criterion's interface: ``matcher`` (its ``set_epoch`` is passed on to the branch's
    matcher at every call, so annealed matchers follow the same schedule), ``cls_loss``, ``num_classes`` and
    ``class_cost``; ``synchronize_state`` and the state dict cover both branches (e.g. two aLRP self-balance
    windows)."""

    def __init__(self, main: SetCriterion, one_to_many: SetCriterion, loss_weight: float = 1.0) -> None:
        super().__init__()
        if loss_weight < 0:
            raise ValueError(f"hybrid.loss_weight={loss_weight} must be >= 0")
        self.main = main
        self.one_to_many = one_to_many
        self.loss_weight = loss_weight

    @property
    def matcher(self) -> Matcher:
        return self.main.matcher

    @property
    def cls_loss(self) -> ClassificationLoss:
        return self.main.cls_loss

    @property
    def num_classes(self) -> int:
        return self.main.num_classes

    @property
    def class_cost(self) -> str:
        return self.main.class_cost

    def synchronize_state(self) -> None:
        """Collective: both branches' running loss state made identical on every process."""
        self.main.synchronize_state()
        self.one_to_many.synchronize_state()

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        result = self.main(outputs, targets)
        branch = outputs.get(ONE_TO_MANY)
        if branch is None:
            if self.training:
                raise ValueError(
                    "hybrid criterion in training: the model returned no 'one_to_many' outputs (build it with "
                    "hybrid.num_queries > 0, and call it in train mode)"
                )
            return result
        self.one_to_many.matcher.set_epoch(self.main.matcher.epoch, self.main.matcher.num_epochs)
        extra = self.one_to_many(_float(branch), targets)
        for name, value in extra.items():
            if name not in _METRICS:
                result[name + SUFFIX] = value
        result["loss"] = result["loss"] + self.loss_weight * extra["loss"]
        return result
