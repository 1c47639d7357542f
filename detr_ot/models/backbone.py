"""CNN backbones returning their last feature map, or their last few, each with its padding mask.

Padding is honoured exactly: every convolution and max-pool of the backbone sees zeros where the image
is padded, which is what it sees past the border of an unpadded image. So an image's features, and hence
its detections, do not depend on which other images share its batch (in facebookresearch/detr the AP moves
with the evaluation batch size because padded pixels leak into the features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class MaskedConvContext:
    """Forward pre-hooks that zero the padded region of every conv / max-pool input.

    For a feature map of stride ``s`` the valid region of an image whose unpadded size is ``(h, w)`` is
    ``ceil(h / s) x ceil(w / s)``, exactly what stride-``s`` convolutions with ``padding = k // 2`` produce
    on the unpadded image. Max-pools follow ReLUs, so zero equals their ``-inf`` padding.
    """

    def __init__(self, module: nn.Module) -> None:
        self.valid_hw: torch.Tensor | None = None  # (B, 2) unpadded input sizes
        self.input_hw: tuple[int, int] = (0, 0)
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.MaxPool2d):
                m.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if self.valid_hw is None:
            return None
        x = args[0]
        return (x * self.mask_for(x.shape[-2:], x.device, x.dtype),) + tuple(args[1:])

    def mask_for(self, hw: torch.Size | tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, h, w) with 1 on the valid region of each image at that resolution."""
        assert self.valid_hw is not None
        h, w = int(hw[0]), int(hw[1])
        stride_h = 2 ** round(math.log2(self.input_hw[0] / h))
        stride_w = 2 ** round(math.log2(self.input_hw[1] / w))
        vh = torch.div(self.valid_hw[:, 0] + stride_h - 1, stride_h, rounding_mode="floor")
        vw = torch.div(self.valid_hw[:, 1] + stride_w - 1, stride_w, rounding_mode="floor")
        rows = torch.arange(h, device=device)[None, :] < vh.to(device)[:, None]
        cols = torch.arange(w, device=device)[None, :] < vw.to(device)[:, None]
        return (rows[:, :, None] & cols[:, None, :])[:, None].to(dtype)


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) unpadded (h, w) from a padding mask (True on padding, padding at the bottom/right)."""
    valid = ~mask
    return torch.stack([valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)], dim=1)


def feature_mask(mask: torch.Tensor, feature_hw: tuple[int, int], stride: int) -> torch.Tensor:
    """Padding mask of a stride-``stride`` feature map (True on padding), with ceil semantics."""
    sizes = valid_sizes(mask)
    vh = torch.div(sizes[:, 0] + stride - 1, stride, rounding_mode="floor")
    vw = torch.div(sizes[:, 1] + stride - 1, stride, rounding_mode="floor")
    h, w = feature_hw
    rows = torch.arange(h, device=mask.device)[None, :] < vh[:, None]
    cols = torch.arange(w, device=mask.device)[None, :] < vw[:, None]
    return ~(rows[:, :, None] & cols[:, None, :])


class Backbone(nn.Module):
    """Wraps a feature extractor ``body`` (image -> its last ``len(strides)`` feature maps, finest first).

    ``forward`` returns the last (coarsest) map and its padding mask, as DETR uses; ``forward_levels``
    returns every map with its mask, for multi-scale detectors (Zhu et al., Deformable DETR, ICLR 2021,
    Sec. 4.1 use C3-C5, strides 8, 16, 32). ``num_channels_list`` and ``strides`` describe those maps;
    ``num_channels`` and ``stride`` the last one.
    """

    def __init__(self, body: nn.Module, num_channels: int | Sequence[int], stride: int | Sequence[int]) -> None:
        super().__init__()
        channels = [int(num_channels)] if isinstance(num_channels, int) else [int(c) for c in num_channels]
        strides = [int(stride)] if isinstance(stride, int) else [int(s) for s in stride]
        if not channels or len(channels) != len(strides):
            raise ValueError(f"Backbone: {len(channels)} channel counts for {len(strides)} strides")
        self.body = body
        self.num_channels_list = channels
        self.strides = strides
        self.num_channels = channels[-1]
        self.stride = strides[-1]
        self._masking = MaskedConvContext(body)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def _levels(self, images: torch.Tensor, mask: torch.Tensor, first: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        padded = bool(mask.any())
        if padded:
            self._masking.valid_hw = valid_sizes(mask)
            self._masking.input_hw = (images.shape[-2], images.shape[-1])
        try:
            feats = self.body(images)
        finally:
            self._masking.valid_hw = None
        if not isinstance(feats, list | tuple):
            feats = [feats]
        if len(feats) < self.num_levels:
            raise RuntimeError(f"Backbone body returned {len(feats)} feature maps, expected {self.num_levels}")
        out = []
        for f, s in list(zip(feats[-self.num_levels :], self.strides, strict=True))[first:]:
            fmask = feature_mask(mask, (f.shape[-2], f.shape[-1]), s)
            out.append((f.masked_fill(fmask[:, None], 0.0) if padded else f, fmask))
        return out

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last feature map (stride ``stride``), zero on padding, and its mask (True on padding)."""
        return self._levels(images, mask, self.num_levels - 1)[0]

    def forward_levels(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every returned map (strides ``strides``, finest first), zero on padding, each with its mask."""
        return self._levels(images, mask, 0)


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _StagedSequential(nn.Sequential):
    """A flat ``nn.Sequential`` (parameter names as a plain one) returning the outputs of its last stages."""

    def __init__(self, layers: list[nn.Module], stage_ends: list[int]) -> None:
        super().__init__(*layers)
        self.stage_ends = stage_ends  # index of each returned stage's last layer

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outs = []
        for i, layer in enumerate(self):
            x = layer(x)
            if i in self.stage_ends:
                outs.append(x)
        return outs


def tiny_backbone(widths: tuple[int, ...] = (32, 64, 128, 256), levels: int = 1) -> Backbone:
    """A small VGG-style CNN for CPU runs: one stride-2 stage per width, stride ``2 ** len(widths)``.

    ``levels`` > 1 also returns the maps of the stages before the last (strides ``2 ** i``).
    """
    if not 1 <= levels <= len(widths):
        raise ValueError(f"tiny backbone: levels={levels} must be in [1, {len(widths)}] (one per width {widths})")
    layers: list[nn.Module] = []
    ends: list[int] = []
    cin = 3
    for i, cout in enumerate(widths):
        layers += _conv_bn(cin, cout, 2)
        if i > 0:
            layers += _conv_bn(cout, cout, 1)
        ends.append(len(layers) - 1)
        cin = cout
    n = len(widths)
    return Backbone(
        _StagedSequential(layers, ends[n - levels :]),
        list(widths[n - levels :]),
        [2 ** (i + 1) for i in range(n - levels, n)],
    )


class BackboneWeightsError(RuntimeError):
    """Pretrained backbone weights could not be obtained."""


def timm_backbone(
    name: str, pretrained: bool, weights: str | None, train_backbone: bool = True, levels: int = 1
) -> Backbone:
    """A timm CNN (e.g. ``resnet50``) with frozen BatchNorm and its last ``levels`` feature maps.

    ``levels=1`` is DETR's single stride-32 map (C5 of a ResNet); ``levels=3`` gives C3-C5 (strides 8,
    16, 32), the input of Deformable DETR (Zhu et al., ICLR 2021, Sec. 4.1).

    ``weights`` (config key ``model.backbone_weights``) loads a local file; otherwise ``pretrained`` asks
    timm to download them, which fails offline with a message naming that key.
    """
    import timm

    if levels < 1:
        raise ValueError(f"backbone {name!r}: levels={levels} must be >= 1")
    kwargs = dict(features_only=True, out_indices=tuple(range(-levels, 0)))
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"model.backbone_weights={weights!r}: no such file")
        body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
    elif pretrained:
        hint = (
            "Offline, download them elsewhere and set model.backbone_weights=/path/to/weights.(pth|safetensors), "
            "or train from scratch with model.pretrained=false."
        )
        reason = _hub_unreachable()
        try:
            if reason is not None:  # fail in seconds, not after the hub client's minute of retries
                raise OSError(reason)
            body = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # network errors come in many types (OSError, HTTP errors, hub errors)
            raise BackboneWeightsError(
                f"could not download pretrained weights for backbone {name!r} ({type(err).__name__}: {err}). {hint}"
            ) from err
    else:
        body = timm.create_model(name, pretrained=False, **kwargs)
    body = timm.layers.freeze_batch_norm_2d(body)
    if not train_backbone:
        body.requires_grad_(False)
    info = body.feature_info
    return Backbone(body, info.channels(), info.reduction())


def _hub_unreachable(host: str = "huggingface.co", timeout: float = 3.0) -> str | None:
    """Why the weights hub cannot be reached, or None if it may be (a proxy or a cache is trusted)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        cached = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        return None if cached.is_dir() else "HF_HUB_OFFLINE is set and there is no local hub cache"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        return f"{host} is unreachable ({err})"
    return None


def build_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    train: bool = True,
    tiny_widths: tuple[int, ...] = (32, 64, 128, 256),
    levels: int = 1,
) -> Backbone:
    """The named backbone returning its last ``levels`` feature maps (``forward`` always gives the last)."""
    if name == "tiny":
        return tiny_backbone(tuple(tiny_widths), levels)
    return timm_backbone(name, pretrained, weights, train, levels)


