"""Multi-scale deformable attention in pure PyTorch (no custom CUDA/C++ op).

Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021, eq. 3:
each query attends, per head, to ``P`` sampled points on each of ``L`` feature levels, around a reference
point; the sampling offsets and the attention weights (softmax over the ``L * P`` points of a head) are
linear functions of the query, and the values are read by bilinear interpolation.

Coordinate conventions (shared by :func:`ms_deform_attn_sample` and :class:`MSDeformAttn`):

* a sampling location ``(x, y)`` is normalised over the PADDED map of its level: ``0`` is the left/top
  edge and ``1`` the right/bottom edge of the map (``align_corners=False``), so the centre of cell
  ``(i, j)`` is ``((j + 0.5) / W_l, (i + 0.5) / H_l)``; the pixel coordinate is ``x * W_l - 0.5``;
* reference points are given over the padded map too: the caller multiplies references normalised over
  an image's valid region by that image's valid ratio ``(w_l / W_l, h_l / H_l)`` at each level;
* 2-d references move by offsets counted in cells of the level (``offset / (W_l, H_l)``); 4-d references
  ``(cx, cy, w, h)`` move by ``offset / P * (w, h) / 2`` (the paper's iterative box refinement form).

Why this makes the attention padding invariant: with ``r = w_l / W_l`` the pixel coordinate of a sampling
point is ``(p * r + o / W_l) * W_l - 0.5 = p * w_l + o - 0.5`` for a 2-d reference ``p`` (normalised over
the valid region) and an offset ``o``; ``W_l`` has dropped out, so the point lands on the same feature cell
whether or not the image is padded (likewise for 4-d references, whose size ``w * r`` is scaled alike).
The cells beyond the valid region hold zeros (the projected values are masked with the padding mask),
which is exactly what ``grid_sample``'s zero padding returns beyond the border of the unpadded image. So
an image's output does not depend on the other images of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_Shapes = Tensor | Sequence[Sequence[int]]


def _as_int_list(x: _Shapes, name: str) -> list:
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        return x.tolist()  # one host sync; pass Python lists to avoid it
    return [list(s) if isinstance(s, Sequence) else s for s in x]


def ms_deform_attn_sample(
    value: Tensor,
    spatial_shapes: _Shapes,
    level_start: _Shapes,
    locations: Tensor,
    weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinear samples of multi-level values (Zhu et al., Deformable DETR, ICLR 2021, eq. 3).

    Args:
        value: ``(B, S, nH, Dh)`` per-head values of all levels, flattened row-major level after level.
        spatial_shapes: ``(L, 2)`` integer ``(H_l, W_l)`` of each (padded) level (tensor or nested list;
            a tensor costs one host sync to read).
        level_start: ``(L,)`` integer offset of level ``l`` in ``S``.
        locations: ``(B, Q, nH, L, P, 2)`` sampling points ``(x, y)`` normalised to ``[0, 1]`` over the
            padded map of each level (``align_corners=False``); points outside the map read zeros.
        weights: ``(B, Q, nH, L, P)`` attention weights (normalised by the caller).

    Returns:
        ``(B, Q, nH * Dh)`` in ``value``'s dtype; heads are concatenated head after head.

    The sampling runs ``grid_sample`` once per level (levels differ in size) in the common floating dtype
    of ``value``, ``locations`` and ``weights`` (so it also runs under autocast, which may hand it mixed
    dtypes); the weighted sum over points is taken per level and accumulated over levels, so no tensor
    holds the samples of all levels at once.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, nH, Dh), got shape {tuple(value.shape)}")
    B, S, nH, Dh = value.shape
    shapes = _as_int_list(spatial_shapes, "spatial_shapes")
    starts = _as_int_list(level_start, "level_start")
    L = len(shapes)
    if any(len(s) != 2 for s in shapes):
        raise ValueError(f"spatial_shapes must be (L, 2) pairs (H_l, W_l), got {shapes}")
    if len(starts) != L:
        raise ValueError(f"level_start has {len(starts)} entries but spatial_shapes has {L} levels")
    if locations.dim() != 6 or locations.shape[:4] != (B, locations.shape[1], nH, L) or locations.shape[-1] != 2:
        raise ValueError(
            f"locations must be (B, Q, nH, L, P, 2) = ({B}, Q, {nH}, {L}, P, 2), got shape {tuple(locations.shape)}"
        )
    Q, P = locations.shape[1], locations.shape[4]
    if weights.shape != (B, Q, nH, L, P):
        raise ValueError(f"weights must be (B, Q, nH, L, P) = {(B, Q, nH, L, P)}, got shape {tuple(weights.shape)}")
    for lvl, ((h, w), s0) in enumerate(zip(shapes, starts, strict=True)):
        if h <= 0 or w <= 0 or s0 < 0 or s0 + h * w > S:
            raise ValueError(f"level {lvl}: shape ({h}, {w}) at offset {s0} does not fit in value's S={S}")

    dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"value/locations/weights must be floating point, got {value.dtype}, {locations.dtype}")
    v = value.to(dtype)
    # grid_sample's grid is in [-1, 1] (align_corners=False: -1 and 1 are the outer edges of the map).
    grid = (locations.to(dtype) * 2 - 1).permute(0, 2, 3, 1, 4, 5).reshape(B * nH, L, Q, P, 2)
    w = weights.to(dtype).permute(0, 2, 3, 1, 4).reshape(B * nH, L, Q, P)
    out = None
    for lvl, ((h, wd), s0) in enumerate(zip(shapes, starts, strict=True)):
        v_l = v[:, s0 : s0 + h * wd].permute(0, 2, 3, 1).reshape(B * nH, Dh, h, wd)
        sampled = F.grid_sample(v_l, grid[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        term = (sampled * w[:, lvl, None]).sum(-1)  # (B*nH, Dh, Q)
        out = term if out is None else out + term
    if out is None:
        raise ValueError("spatial_shapes is empty: need at least one level")
    return out.view(B, nH * Dh, Q).transpose(1, 2).contiguous().to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Zhu et al., Deformable DETR, ICLR 2021, eq. 3).

    ``sampling_offsets`` and ``attention_weights`` map each query to ``nH * L * P`` offsets and weights;
    ``value_proj`` / ``output_proj`` are the value and output projections. Offsets start (zero weights,
    bias below) on ``P`` points spread along one direction per head, ``cos, sin(2 pi h / nH)`` scaled to
    unit max-norm and by the point index ``p + 1``, with uniform attention: the paper's initialisation.
    See the module docstring for the coordinate conventions and why they make the output padding invariant.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if min(n_levels, n_heads, n_points) < 1:
            raise ValueError(f"n_levels={n_levels}, n_heads={n_heads}, n_points={n_points} must all be >= 1")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nH, L, P = self.n_heads, self.n_levels, self.n_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(nH, dtype=torch.float64) * (2.0 * math.pi / nH)
        dirs = torch.stack([theta.cos(), theta.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values  # (nH, 2), max |component| = 1
        scale = torch.arange(1, P + 1, dtype=torch.float64).view(1, 1, P, 1)
        bias = dirs.view(nH, 1, 1, 2) * scale.expand(nH, L, P, 1)  # (nH, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: _Shapes,
        level_start: _Shapes,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to ``value_input`` around ``reference_points``.

        Args:
            query: ``(B, Q, d)``.
            reference_points: ``(B, Q, L, 2)`` ``(x, y)`` or ``(B, Q, L, 4)`` ``(cx, cy, w, h)``, normalised
                over the padded map of each level (already multiplied by the valid ratios).
            value_input: ``(B, S, d)`` flattened multi-level features.
            spatial_shapes: ``(L, 2)`` ``(H_l, W_l)``; level_start: ``(L,)`` offsets in ``S``.
            padding_mask: ``(B, S)`` True on padded cells, whose values are zeroed, or None.

        Returns:
            ``(B, Q, d)``.
        """
        nH, L, P, d = self.n_heads, self.n_levels, self.n_points, self.d_model
        if query.dim() != 3 or query.shape[-1] != d:
            raise ValueError(f"query must be (B, Q, {d}), got shape {tuple(query.shape)}")
        B, Q, _ = query.shape
        if value_input.dim() != 3 or value_input.shape[0] != B or value_input.shape[-1] != d:
            raise ValueError(f"value_input must be ({B}, S, {d}), got shape {tuple(value_input.shape)}")
        S = value_input.shape[1]
        if reference_points.shape[:3] != (B, Q, L) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be ({B}, {Q}, {L}, 2 or 4), got shape {tuple(reference_points.shape)}"
            )
        if padding_mask is not None and padding_mask.shape != (B, S):
            raise ValueError(f"padding_mask must be ({B}, {S}), got shape {tuple(padding_mask.shape)}")
        shapes = _as_int_list(spatial_shapes, "spatial_shapes")
        if len(shapes) != L:
            raise ValueError(f"spatial_shapes has {len(shapes)} levels, the module was built for n_levels={L}")

        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, nH, d // nH)
        offsets = self.sampling_offsets(query).view(B, Q, nH, L, P, 2)
        attn = self.attention_weights(query).view(B, Q, nH, L * P).softmax(-1).view(B, Q, nH, L, P)
        ref = reference_points[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 2|4)
        if reference_points.shape[-1] == 2:
            dtype = torch.promote_types(offsets.dtype, reference_points.dtype)
            hw = torch.as_tensor(shapes, dtype=dtype, device=offsets.device)  # (L, 2) = (H, W)
            locations = ref + offsets / hw.flip(-1)[:, None, :]  # offsets in cells of each level
        else:
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        out = ms_deform_attn_sample(value, shapes, level_start, locations, attn)
        return self.output_proj(out)
