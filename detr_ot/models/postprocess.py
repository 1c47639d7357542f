"""Turn raw DETR outputs into scored, labelled, absolute-coordinate detections for COCO evaluation.

Softmax head: Carion et al., "End-to-End Object Detection with Transformers" (ECCV 2020), Sec. 4 -- each
query predicts one object; its score is the largest real-class probability (the no-object class, last,
is excluded). Sigmoid (focal-loss) head: Zhu et al., "Deformable DETR" (ICLR 2021) -- every (query, class)
pair is a candidate; the ``num_select`` highest sigmoid scores over all Q*K pairs are kept.

Optional class-wise non-maximum suppression (``nms_iou > 0``): a one-to-many-trained DETR predicts several
boxes per object, and Ouyang-Zhang et al., "NMS Strikes Back" (DETA, arXiv 2212.06137) remove the duplicates
with NMS at inference. A one-to-one model needs none (Carion et al.), so it is off by default.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import batched_nms

from detr_ot.boxes import cxcywh_to_xyxy


class PostProcess(nn.Module):
    """``forward(outputs, orig_sizes) -> [ {"scores": (N,), "labels": (N,) int64 in 0..K-1,
    "boxes": (N,4) xyxy in pixels of the original image} per image ]``.

    N = Q for the softmax head and ``min(num_select, Q*K)`` (sorted by decreasing score) for the sigmoid
    head. Boxes are not clipped to the image. Half-precision inputs are processed in float32.

    ``nms_iou > 0`` then drops every detection whose IoU with a higher-scoring detection of the same image and
    class exceeds ``nms_iou`` (greedy NMS, ``torchvision.ops.batched_nms``, one call for the whole batch); the
    survivors keep their order.
    """

    def __init__(self, sigmoid: bool, num_select: int = 100, nms_iou: float = 0.0) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"PostProcess: num_select must be >= 1, got {num_select}")
        if not 0.0 <= nms_iou <= 1.0:
            raise ValueError(f"PostProcess: nms_iou must be in [0, 1] (0: no NMS), got {nms_iou}")
        self.sigmoid = bool(sigmoid)
        self.num_select = int(num_select)
        self.nms_iou = float(nms_iou)

    def extra_repr(self) -> str:
        return f"sigmoid={self.sigmoid}, num_select={self.num_select}, nms_iou={self.nms_iou}"

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], orig_sizes: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if (
            logits.dim() != 3
            or boxes.dim() != 3
            or boxes.shape[-1] != 4
            or boxes.shape[:2] != logits.shape[:2]
        ):
            raise ValueError(
                "PostProcess: expected pred_logits (B,Q,C) and pred_boxes (B,Q,4), got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        batch, num_queries, num_logits = logits.shape
        if orig_sizes.shape != (batch, 2):
            raise ValueError(
                f"PostProcess: orig_sizes must be (B,2)=({batch},2) [h,w], got {tuple(orig_sizes.shape)}"
            )
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(dtype)
        boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))

        if self.sigmoid:
            prob = logits.sigmoid().flatten(1)  # (B, Q*K), index = q*K + k
            scores, flat_idx = prob.topk(min(self.num_select, num_queries * num_logits), dim=1)
            labels = flat_idx % num_logits
            query_idx = torch.div(flat_idx, num_logits, rounding_mode="floor")
            boxes = torch.gather(boxes, 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        else:
            if num_logits < 2:
                raise ValueError("PostProcess: softmax head needs K+1 >= 2 logits (last = no-object)")
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)

        img_h, img_w = orig_sizes.to(device=boxes.device, dtype=boxes.dtype).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # (B, 4)
        boxes = cxcywh_to_xyxy(boxes) * scale[:, None, :]
        if self.nms_iou > 0:
            return self._suppress(scores, labels, boxes, num_logits)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes, strict=True)]

    def _suppress(
        self, scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, num_logits: int
    ) -> list[dict[str, torch.Tensor]]:
        """Class-wise NMS per image, batched: the group of a detection is (image, label)."""
        batch, n = scores.shape
        image = torch.arange(batch, device=scores.device).unsqueeze(1).expand(batch, n)
        groups = (image * num_logits + labels).flatten()
        kept = batched_nms(boxes.reshape(-1, 4), scores.flatten(), groups, self.nms_iou)
        keep = torch.zeros(batch * n, dtype=torch.bool, device=scores.device)
        keep[kept] = True
        keep = keep.view(batch, n)
        return [
            {"scores": s[k], "labels": l[k], "boxes": b[k]}
            for s, l, b, k in zip(scores, labels, boxes, keep, strict=True)
        ]
