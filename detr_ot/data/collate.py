"""Batch collation: zero-pad images to a common size and build the padding mask (DETR's NestedTensor)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate_batch"]


def collate_batch(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisibility: int = 32
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Stack ``(image (3, H_i, W_i), target)`` pairs into ``(images (B, 3, Hp, Wp), mask (B, Hp, Wp),
    targets)``.

    Each image sits at the top-left and is zero-padded at the bottom/right; ``Hp``/``Wp`` are the batch maxima
    rounded up to a multiple of ``size_divisibility`` (no rounding if it is 0 or 1). ``mask`` is True on
    padding. Target boxes stay normalised to each image's own (unpadded) size."""
    if len(batch) == 0:
        raise ValueError("collate_batch got an empty batch")
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            raise TypeError(
                f"batch item {i}: expected an image tensor (C, H, W), got {type(img).__name__}"
                f"{tuple(img.shape) if isinstance(img, torch.Tensor) else ''}; "
                "did the dataset get transforms?"
            )
    channels = images[0].shape[0]
    if any(img.shape[0] != channels for img in images):
        counts = [img.shape[0] for img in images]
        raise ValueError(f"images in a batch must share the channel count, got {counts}")
    hp = max(img.shape[1] for img in images)
    wp = max(img.shape[2] for img in images)
    if size_divisibility > 1:
        hp = -(-hp // size_divisibility) * size_divisibility
        wp = -(-wp // size_divisibility) * size_divisibility
    out = images[0].new_zeros((len(images), channels, hp, wp))
    mask = torch.ones((len(images), hp, wp), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        out[i, :, :h, :w].copy_(img)
        mask[i, :h, :w] = False
    return out, mask, targets
