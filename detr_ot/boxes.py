"""Box conversions and (generalised) IoU, on top of torchvision.ops."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, generalized_box_iou

_MIN_AREA = 1e-7  # in normalised image units: a 0.03% x 0.03% box


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def pairwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU (Rezatofighi et al., CVPR 2019) between every box of ``boxes1`` (B, N, 4) and ``boxes2``
    (B, M, 4), both xyxy; returns (B, N, M) (2-D inputs give (N, M))."""
    if boxes1.dim() == 2:
        return generalized_box_iou(boxes1, boxes2)
    return pairwise_iou_giou(boxes1, boxes2)[1]


def pairwise_iou_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU, GIoU), each (B, N, M), between xyxy boxes (B, N, 4) and (B, M, 4) (GIoU: Rezatofighi et al.,
    CVPR 2019, Algorithm 1), computed together with a hand-written backward.

    The values are those of the plain autograd formula (``_reference_iou_giou``), operation for operation.
    The backward is analytic: it keeps only the boxes and a few (B, N, M) tensors instead of autograd's many
    broadcast intermediates, and differentiates both outputs in one pass. At ties of the min/max it splits the
    gradient evenly between the two boxes and at the clamps it passes none, as autograd does. Both inputs are
    promoted to a common dtype (as autograd's broadcasting would); the gradients come back in each input's
    dtype. The backward sums in another order than autograd's (equal to rounding: tested to 1e-10 in float64).
    First-order only: a second derivative raises.
    """
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"pairwise_iou_giou: {name} must be (B, N, 4) xyxy boxes, got {tuple(boxes.shape)}")
    if boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(
            f"pairwise_iou_giou: batch sizes differ, boxes1 {tuple(boxes1.shape)} vs boxes2 {tuple(boxes2.shape)}"
        )
    return _PairwiseIoUGIoU.apply(boxes1, boxes2)


# Coordinates (x0, y0, x1, y1) as (-x0, -y0, x1, y1): then the intersection's corners are all a minimum, the
# enclosing box's all a maximum, and each width/height is a sum of two of them (negation is exact, and
# a + (-b) rounds exactly as a - b, so the values equal the reference's). The pairwise tensors are laid out
# coordinate-major, (4, B, N, M), so that every elementwise operation runs over contiguous (B, N, M) blocks.
_FLIP = (-1.0, -1.0, 1.0, 1.0)


def _flipped(boxes: torch.Tensor) -> torch.Tensor:
    """(B, N, 4) xyxy -> (4, B, N) as (-x0, -y0, x1, y1)."""
    # contiguous: else the elementwise kernels, following the inputs' strides, lay the pairwise tensors out
    # coordinate-minor again
    return (boxes * boxes.new_tensor(_FLIP)).permute(2, 0, 1).contiguous()


def _above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where ``x > threshold``, else 0, in ``x``'s dtype: the clamp's backward mask, without
    ``torch.where`` (whose CPU kernel is several times slower than arithmetic on data-dependent masks). In
    floating point ``x - t`` is 0 only at ``x == t``. Computed in place on fresh tensors: on CPU each new
    (B, N, M) buffer costs page faults comparable to the arithmetic."""
    return (x - threshold).sign_().clamp_(min=0)


def _swap_mul(wh: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(h * factor, w * factor) from (w, h), (2, B, N, M), written straight into one buffer."""
    out = torch.empty_like(wh)
    torch.mul(wh[1], factor, out=out[0])
    torch.mul(wh[0], factor, out=out[1])
    return out


class _PairwiseIoUGIoU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        dtype = torch.promote_types(b1.dtype, b2.dtype)
        p, g = _flipped(b1.to(dtype)), _flipped(b2.to(dtype))  # (4, B, N), (4, B, M)
        pe, ge = p[..., :, None], g[..., None, :]
        inner, outer = torch.minimum(pe, ge), torch.maximum(pe, ge)  # (4, B, N, M)
        wh_i = (inner[:2] + inner[2:]).clamp_(min=0)  # intersection width, height
        wh_c = (outer[:2] + outer[2:]).clamp_(min=0)  # enclosing box width, height
        inter = wh_i[0] * wh_i[1]
        area1 = (p[2] + p[0]) * (p[3] + p[1])
        area2 = (g[2] + g[0]) * (g[3] + g[1])
        # The clamps only act on degenerate pairs, e.g. a collapsed predicted box against a padded (all-zero)
        # ground-truth column: without them 0 / 0 gives NaN in the forward and, through the masked entries, in
        # the backward whenever the matching cost itself is differentiated (gu, sinkhorn).
        union_raw = area1[:, :, None] + area2[:, None, :] - inter
        union = union_raw.clamp(min=_MIN_AREA)
        iou = inter / union
        hull_raw = wh_c[0] * wh_c[1]
        hull = hull_raw.clamp(min=_MIN_AREA)
        giou = iou - (hull - union) / hull
        ctx.save_for_backward(p, g, wh_i, wh_c, union_raw, hull_raw, inter, iou, union, hull)
        ctx.dtypes = (b1.dtype, b2.dtype)
        ctx.set_materialize_grads(False)
        return iou, giou

    @staticmethod
    def backward(ctx, grad_iou: torch.Tensor | None, grad_giou: torch.Tensor | None):  # noqa: ANN205
        if torch.is_grad_enabled():
            raise RuntimeError(
                "pairwise_iou_giou has no second derivative (its backward is hand-written): a backward with "
                "create_graph=True went through it; use detr_ot.boxes._reference_iou_giou where one is needed"
            )
        return _PairwiseIoUGIoU._backward(ctx, grad_iou, grad_giou)

    @staticmethod
    def _backward(ctx, grad_iou: torch.Tensor | None, grad_giou: torch.Tensor | None):  # noqa: ANN205
        p, g, wh_i, wh_c, union_raw, hull_raw, inter, iou, union, hull = ctx.saved_tensors
        if grad_iou is None and grad_giou is None:
            return None, None
        # iou = inter / union; giou = iou - (hull - union) / hull, so d giou / d union = 1 / hull and
        # d giou / d hull = -union / hull^2. The clamps pass no gradient at or below their bound (as autograd).
        grad_ratio = grad_giou if grad_iou is None else grad_iou if grad_giou is None else grad_iou + grad_giou
        # The minus signs are carried along (neg_ prefix) rather than spent as separate passes.
        neg_union = grad_ratio * iou
        neg_union.div_(union)
        neg_hull = None
        if grad_giou is not None:
            over_hull = grad_giou / hull
            neg_union.sub_(over_hull)
            neg_hull = over_hull.mul_(union).div_(hull)
        # On CPU, where looking needs no device sync, the masks are skipped when no pair is clamped (the usual case)
        if union_raw.device.type != "cpu" or (
            union_raw.numel() > 0 and (bool(union_raw.min() <= _MIN_AREA) or bool(hull_raw.min() <= _MIN_AREA))
        ):
            neg_union.mul_(_above(union_raw, _MIN_AREA))
            if neg_hull is not None:
                neg_hull.mul_(_above(hull_raw, _MIN_AREA))
        # union_raw = area1 + area2 - inter; inter = w h with w, h clamped at 0: where either is clamped,
        # inter = 0 (sign(inter) = 0) and neither receives a gradient; likewise for the hull, whose mask implies it.
        # (Sides so small that their product underflows to 0 are treated as clamped too.)
        grad_inter = grad_ratio / union
        grad_inter.add_(neg_union).mul_(torch.sign(inter))
        grad_i = _swap_mul(wh_i, grad_inter)  # d/d (width, height) = (height, width) d/d inter: (2, B, N, M)
        # Each flipped coordinate enters the intersection through min(p, g) and the enclosing box through
        # max(p, g), and a width's derivative is the coordinate's. Where p < g box p receives grad_i, where
        # p > g grad_c, at a tie half of each (as autograd's min/max): 0.5 (grad_i + grad_c) +
        # 0.5 sign(g - p) (grad_i - grad_c); box g the other share.
        sign = (g[..., None, :] - p[..., :, None]).sign_().unflatten(0, (2, 2))  # (corner, axis, B, N, M)
        if neg_hull is None:  # grad_c = 0
            both, odd = grad_i, sign.mul_(grad_i)
        else:
            neg_c = _swap_mul(wh_c, neg_hull)  # -grad_c
            both = grad_i - neg_c
            odd = sign.mul_(grad_i.add_(neg_c))
        grads = []
        for need, box, dim, plus in ((ctx.needs_input_grad[0], p, -1, True), (ctx.needs_input_grad[1], g, -2, False)):
            if not need:
                grads.append(None)
                continue
            shared, signed = both.sum(dim), odd.sum(dim)
            coord = (shared + signed if plus else shared - signed).mul_(0.5)  # (corner, axis, B, N)
            # area = (x1 - x0) (y1 - y0): d/d flipped corner = (height, width), the same for both corners
            coord.sub_(neg_union.sum(dim) * (box[2:] + box[:2]).flip(0))
            grad = coord.flatten(0, 1).permute(1, 2, 0) * box.new_tensor(_FLIP)
            grads.append(grad.to(ctx.dtypes[len(grads)]))
        return grads[0], grads[1]


def _reference_iou_giou(b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain autograd formula (IoU, GIoU) of ``pairwise_iou_giou``, kept as the reference of its tests."""
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.maximum(b1[:, :, None, :2], b2[:, None, :, :2])
    rb = torch.minimum(b1[:, :, None, 2:], b2[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (area1[:, :, None] + area2[:, None, :] - inter).clamp(min=_MIN_AREA)
    iou = inter / union
    lt_c = torch.minimum(b1[:, :, None, :2], b2[:, None, :, :2])
    rb_c = torch.maximum(b1[:, :, None, 2:], b2[:, None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1).clamp(min=_MIN_AREA)
    return iou, iou - (hull - union) / hull
