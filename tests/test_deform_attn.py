"""Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021, eq. 3) against an explicit
bilinear-interpolation reference, its gradients, its padding invariance, and the multi-scale backbone."""

from __future__ import annotations

import math

import pytest
import torch

from detr_ot.models.backbone import build_backbone
from detr_ot.models.deform_attn import MSDeformAttn, ms_deform_attn_sample

SHAPES = [(5, 7), (3, 4), (2, 1)]  # three non-square levels of different sizes


def level_start(shapes: list[tuple[int, int]]) -> torch.Tensor:
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def random_case(
    B: int, Q: int, nH: int, Dh: int, P: int, shapes: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(B, S, nH, Dh, generator=g, dtype=dtype)
    # Points in [-0.3, 1.3]: some fall outside the map, some straddle its border.
    locations = torch.rand(B, Q, nH, L, P, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(B, Q, nH, L, P, generator=g, dtype=dtype)
    return value, torch.tensor(shapes), level_start(shapes), locations, weights


def reference_sample(value, shapes, starts, locations, weights) -> torch.Tensor:  # noqa: ANN001
    """Bilinear sampling by explicit indexing: pixel coordinate x * W - 0.5, four neighbours, zeros outside."""
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = torch.zeros(B, Q, nH, Dh, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for h in range(nH):
                for lvl in range(L):
                    H, W = (int(v) for v in shapes[lvl])
                    s0 = int(starts[lvl])
                    for p in range(P):
                        x = float(locations[b, q, h, lvl, p, 0]) * W - 0.5
                        y = float(locations[b, q, h, lvl, p, 1]) * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        for xi, yi, wt in (
                            (x0, y0, (1 - fx) * (1 - fy)),
                            (x0 + 1, y0, fx * (1 - fy)),
                            (x0, y0 + 1, (1 - fx) * fy),
                            (x0 + 1, y0 + 1, fx * fy),
                        ):
                            if 0 <= xi < W and 0 <= yi < H:
                                out[b, q, h] += weights[b, q, h, lvl, p] * wt * value[b, s0 + yi * W + xi, h]
    return out.reshape(B, Q, nH * Dh)


def test_sampling_matches_explicit_bilinear_reference() -> None:
    value, shapes, starts, loc, w = random_case(2, 3, 2, 3, 2, SHAPES, torch.float64)
    # Exact cell centres and edges are included (weights 1 on one cell, or half-outside the map).
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5 / 7, 0.5 / 5], dtype=torch.float64)
    loc[0, 0, 0, 0, 1] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = ms_deform_attn_sample(value, shapes, starts, loc, w)
    want = reference_sample(value, shapes, starts, loc, w)
    assert got.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # At a cell centre the sample is that cell's value.
    one = torch.zeros_like(w)
    one[0, 0, 0, 0, 0] = 1.0
    torch.testing.assert_close(ms_deform_attn_sample(value, shapes, starts, loc, one)[0, 0, :3], value[0, 0, 0])


def randomised_module(d: int, L: int, nH: int, P: int, seed: int = 0) -> MSDeformAttn:
    """The module with its zero-initialised query maps made random, so offsets and weights depend on the query."""
    torch.manual_seed(seed)
    attn = MSDeformAttn(d, L, nH, P).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0.0, 0.5)
        attn.attention_weights.weight.normal_(0.0, 0.5)
        attn.attention_weights.bias.normal_(0.0, 0.5)
    return attn


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, d, H_l, W_l) per level -> (B, S, d)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_is_padding_invariant(ref_dim: int) -> None:
    """An image alone and the same image padded beside a larger one give the same output (float64)."""
    d, nH, P, Q = 8, 2, 3, 5
    valid = [(5, 7), (3, 4), (2, 2)]
    padded = [(7, 9), (4, 5), (2, 3)]
    L = len(valid)
    attn = randomised_module(d, L, nH, P)
    g = torch.Generator().manual_seed(1)
    alone = [torch.randn(1, d, h, w, generator=g, dtype=torch.float64) for h, w in valid]
    # Batch: image 0 is `alone` with garbage (not zeros) on its padding, image 1 fills the padded size.
    maps, masks = [], []
    for (h, w), (hp, wp), a in zip(valid, padded, alone, strict=True):
        m = torch.randn(2, d, hp, wp, generator=g, dtype=torch.float64) * 10
        m[0, :, :h, :w] = a[0]
        pm = torch.zeros(2, hp, wp, dtype=torch.bool)
        pm[0] = True
        pm[0, :h, :w] = False
        maps.append(m)
        masks.append(pm.flatten(1))
    query = torch.randn(2, Q, d, generator=g, dtype=torch.float64)
    # References over the valid region, some outside it; sizes for 4-d references.
    ref = torch.rand(Q, L, ref_dim, generator=g, dtype=torch.float64) * 1.2 - 0.1
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:].abs() * 0.5 + 0.05
    pairs = zip(valid, padded, strict=True)
    ratios = torch.tensor([[w / wp, h / hp] for (h, w), (hp, wp) in pairs], dtype=torch.float64)
    ratios = ratios.repeat(1, ref_dim // 2)  # (L, ref_dim): (rx, ry[, rx, ry])
    ref_batch = torch.stack([ref * ratios, torch.rand(Q, L, ref_dim, generator=g, dtype=torch.float64)])

    out_alone = attn(query[:1], ref[None], flatten_levels(alone), torch.tensor(valid), level_start(valid), None)
    out_batch = attn(
        query, ref_batch, flatten_levels(maps), torch.tensor(padded), level_start(padded), torch.cat(masks, 1)
    )
    torch.testing.assert_close(out_batch[:1], out_alone, rtol=0, atol=1e-10)
    # The test can fail: without the padding mask the garbage leaks in.
    leaky = attn(query, ref_batch, flatten_levels(maps), torch.tensor(padded), level_start(padded), None)
    assert (leaky[:1] - out_alone).abs().max() > 1e-3


# Multi-scale backbone


def test_tiny_multiscale_backbone_is_padding_invariant_at_every_level() -> None:
    """An image's maps alone equal its maps batched beside a larger image, on the valid region, at every
    level; the padding is zero and masked (float64, eval-mode BatchNorm so images do not mix)."""
    torch.manual_seed(0)
    bb = build_backbone("tiny", tiny_widths=(4, 6, 8, 10), levels=3).double().eval()
    for m in bb.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    small = torch.randn(1, 3, 37, 53, dtype=torch.float64)
    big = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    images = torch.zeros(2, 3, 64, 80, dtype=torch.float64)
    images[0, :, :37, :53] = small[0]
    images[0, :, 37:] = 5.0  # garbage on the padding: the masks must hide it
    images[0, :, :, 53:] = -5.0
    images[1] = big[0]
    mask = torch.ones(2, 64, 80, dtype=torch.bool)
    mask[0, :37, :53] = False
    mask[1] = False
    with torch.no_grad():
        alone = bb.forward_levels(small, torch.zeros(1, 37, 53, dtype=torch.bool))
        batched = bb.forward_levels(images, mask)
        last = bb(images, mask)
    assert len(alone) == len(batched) == 3
    for (fa, ma), (fb, mb), s, c in zip(alone, batched, bb.strides, bb.num_channels_list, strict=True):
        h, w = math.ceil(37 / s), math.ceil(53 / s)
        assert fa.shape == (1, c, h, w) and fb.shape == (2, c, math.ceil(64 / s), math.ceil(80 / s))
        assert not ma.any()
        torch.testing.assert_close(fb[0, :, :h, :w], fa[0], rtol=0, atol=1e-12)
        expected_mask = torch.ones_like(mb[0])
        expected_mask[:h, :w] = False
        assert torch.equal(mb[0], expected_mask) and not mb[1].any()
        assert (fb[0].masked_select(mb[0][None]) == 0).all()
        assert fa.abs().max() > 0.1  # the comparison is not between zeros
    torch.testing.assert_close(last[0], batched[-1][0], rtol=0, atol=0)
    assert torch.equal(last[1], batched[-1][1])


def test_backbone_strides_and_channels() -> None:
    tiny = build_backbone("tiny", tiny_widths=(4, 6, 8, 10), levels=3)
    assert (tiny.strides, tiny.num_channels_list, tiny.num_channels, tiny.stride) == ([4, 8, 16], [6, 8, 10], 10, 16)
    one = build_backbone("tiny", tiny_widths=(4, 6, 8, 10))
    assert (one.strides, one.num_channels_list) == ([16], [10])
    # Same parameters under the same names whatever the number of levels (checkpoints stay loadable).
    assert list(one.state_dict()) == list(tiny.state_dict())
    r18 = build_backbone("resnet18", pretrained=False, levels=3)
    assert (r18.strides, r18.num_channels_list, r18.stride, r18.num_channels) == ([8, 16, 32], [128, 256, 512], 32, 512)
    c5 = build_backbone("resnet18")
    assert (c5.strides, c5.num_channels_list) == ([32], [512])
    with torch.no_grad():
        maps = r18.eval().forward_levels(torch.randn(1, 3, 65, 97), torch.zeros(1, 65, 97, dtype=torch.bool))
    assert [tuple(f.shape) for f, _ in maps] == [(1, 128, 9, 13), (1, 256, 5, 7), (1, 512, 3, 4)]
    with pytest.raises(ValueError, match="levels=5"):
        build_backbone("tiny", tiny_widths=(4, 6, 8, 10), levels=5)


def test_sampling_gradients_match_finite_differences() -> None:
    """gradcheck for value, locations and weights (float64). Bilinear interpolation has kinks where a
    pixel coordinate is an integer; the random points are checked to lie far from them."""
    shapes = [(3, 4), (2, 3)]
    value, ss, starts, loc, w = random_case(1, 2, 2, 2, 2, shapes, torch.float64, seed=3)
    sizes = torch.tensor([[wd, h] for h, wd in shapes], dtype=torch.float64)[None, None, None, :, None, :]
    pix = loc * sizes - 0.5
    assert ((pix - pix.round()).abs() > 1e-3).all()
    inputs = (value.requires_grad_(), loc.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, x, a: ms_deform_attn_sample(v, ss, starts, x, a), inputs)


def test_float32_agrees_with_float64() -> None:
    """Same (float32-representable) inputs; the bound is float32's epsilon times the output's scale.

    Per point, the pixel coordinate ``x * W - 0.5`` is computed to a few ulps of ``W + 1``; the bilinear
    sample moves by at most ``2 max|v|`` per pixel, and its interpolation and the weighted sum over the
    ``L * P`` points add a few ulps of ``max|v|`` each. So the error is below
    ``eps * max|v| * sum|w| * (8 (W_max + 1) + 4 + L * P)``, which the tolerance uses with a factor 2 to spare.
    """
    shapes = [(9, 13), (5, 7), (3, 4)]
    value, ss, starts, loc, w = random_case(2, 6, 3, 4, 4, shapes, torch.float32, seed=5)
    got = ms_deform_attn_sample(value, ss, starts, loc, w)
    want = ms_deform_attn_sample(value.double(), ss, starts, loc.double(), w.double())
    assert got.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    L, P = w.shape[-2:]
    w_max = max(max(s) for s in shapes)
    sum_w = w.abs().sum((-2, -1)).max().item()
    tol = 2 * eps * value.abs().max().item() * sum_w * (8 * (w_max + 1) + 4 + L * P)
    err = (got.double() - want).abs().max().item()
    assert err <= tol, (err, tol)


def test_module_runs_under_bfloat16_autocast() -> None:
    torch.manual_seed(0)
    d, L, nH, P = 32, 3, 4, 2
    attn = MSDeformAttn(d, L, nH, P)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0.0, 0.2)
        attn.attention_weights.weight.normal_(0.0, 0.2)
    shapes = [(9, 13), (5, 7), (3, 4)]
    S = sum(h * w for h, w in shapes)
    query, value = torch.randn(2, 7, d), torch.randn(2, S, d)
    ref = torch.rand(2, 7, L, 2)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[1, :5] = True
    full = attn(query, ref, value, torch.tensor(shapes), level_start(shapes), pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(query, ref, value, torch.tensor(shapes), level_start(shapes), pad)
    assert low.shape == (2, 7, d) and torch.isfinite(low).all()
    # bfloat16 keeps 8 significant bits (eps 2 ** -7); a few chained roundings stay far below 10 percent.
    assert (low.float() - full).norm() <= 0.1 * full.norm()


def test_module_initialisation_follows_the_paper() -> None:
    """Zero query weights; offsets of head h along (cos, sin)(2 pi h / nH) scaled to max-norm 1, times p + 1;
    uniform attention over the L * P points of a head."""
    nH, L, P = 8, 2, 3
    attn = MSDeformAttn(16, L, nH, P)
    dirs = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    expected = dirs[:, None, None, :] * torch.arange(1, P + 1, dtype=torch.float32)[None, None, :, None]
    bias = attn.sampling_offsets.bias.detach().view(nH, L, P, 2)
    torch.testing.assert_close(bias, expected.expand(nH, L, P, 2), rtol=0, atol=1e-6)
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()
    assert (attn.attention_weights.bias == 0).all()
    assert (attn.value_proj.bias == 0).all() and (attn.output_proj.bias == 0).all()
    # Uniform attention: a constant value map reads back its projection wherever every point lands inside.
    shapes = [(9, 9), (8, 8)]  # points at most P = 3 cells from the centre stay inside
    S = 81 + 64
    value = torch.ones(1, S, 16)
    ref = torch.full((1, 1, L, 2), 0.5)
    out = attn(torch.randn(1, 1, 16), ref, value, torch.tensor(shapes), level_start(shapes), None)
    torch.testing.assert_close(out, attn.output_proj(attn.value_proj(value[:, :1])), rtol=0, atol=1e-5)


def test_bad_inputs_name_what_is_wrong() -> None:
    value, ss, starts, loc, w = random_case(1, 2, 2, 2, 2, SHAPES, torch.float64)
    with pytest.raises(ValueError, match="weights must be"):
        ms_deform_attn_sample(value, ss, starts, loc, w[..., :1])
    with pytest.raises(ValueError, match="locations must be"):
        ms_deform_attn_sample(value, ss, starts, loc[:, :, :1], w)
    with pytest.raises(ValueError, match="does not fit"):
        ms_deform_attn_sample(value[:, :-1], ss, starts, loc, w)
    with pytest.raises(TypeError, match="spatial_shapes"):
        ms_deform_attn_sample(value, ss.double(), starts, loc, w)
    attn = MSDeformAttn(8, 3, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(10, 3, 4, 2)
    query, val = torch.randn(1, 2, 8), torch.randn(1, 38, 8)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.rand(1, 2, 3, 3), val, ss, starts, None)
    with pytest.raises(ValueError, match="padding_mask"):
        attn(query, torch.rand(1, 2, 3, 2), val, ss, starts, torch.zeros(1, 37, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_levels=3"):
        attn(query, torch.rand(1, 2, 3, 2), val, ss[:2], starts[:2], None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    value, ss, starts, loc, w = random_case(2, 5, 2, 3, 3, SHAPES, torch.float64, seed=7)
    cpu = ms_deform_attn_sample(value, ss, starts, loc, w)
    gpu = ms_deform_attn_sample(value.cuda(), ss.cuda(), starts.cuda(), loc.cuda(), w.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)
    attn = randomised_module(8, len(SHAPES), 2, 3)
    S = sum(h * wd for h, wd in SHAPES)
    q, v = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, S, 8, dtype=torch.float64)
    ref = torch.rand(2, 4, 3, 4)
    want = attn(q, ref.double(), v, ss, starts, None)
    with torch.autocast("cuda", dtype=torch.float16):
        low = attn.float().cuda()(q.float().cuda(), ref.cuda(), v.float().cuda(), ss.cuda(), starts.cuda(), None)
    # float16 keeps 11 significant bits (eps 2 ** -10); a few chained roundings stay far below 5 percent.
    assert torch.isfinite(low).all() and (low.double().cpu() - want).norm() <= 0.05 * want.norm()
