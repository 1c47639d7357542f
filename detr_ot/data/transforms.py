"""Joint image + target transforms (DETR recipe), built on ``torchvision.transforms.v2`` box support.

Every transform takes and returns ``(image, target)``. Between transforms the image is a PIL image or a
(C, H, W) tensor and ``target["boxes"]`` holds absolute xyxy boxes; :class:`ToTensorNormalize` (always last)
turns the image into a normalised float tensor and the boxes into cxcywh normalised by the final (w, h), as
the DETR data contract requires. Randomness comes from torch's global RNG, so DataLoader workers are seeded
by PyTorch.

Presets (:func:`build_transforms`):
  * ``coco`` -- Carion et al., ECCV 2020, Sec. 4 / A.4: horizontal flip, then with probability 1/2 a
    multi-scale resize (shorter side 480..800 step 32, longer side at most 1333) or resize to {400, 500, 600},
    random crop of side 384..600, multi-scale resize; evaluation resizes the shorter side to 800
    (longer <= 1333). Every one of these sizes comes from a :class:`Resolution` (the ``data.scales``,
    ``data.max_size``, ``data.val_scale``, ``data.crop_scales`` and ``data.crop_size`` config keys), so the
    same recipe serves a dataset of small images at a reduced resolution.
  * ``shapes`` -- horizontal flip for training, identity for evaluation (the synthetic images are small; the
    resolution keys do not apply).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detr_ot.registry import Registry

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TRANSFORMS",
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "Resolution",
    "ToTensorNormalize",
    "build_transforms",
    "resized_hw",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Per-box target fields, filtered together when a crop drops boxes.
_PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")

Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]

TRANSFORMS: Registry[Transform] = Registry("transforms preset")


def _hw(image: Any) -> tuple[int, int]:
    h, w = F.get_size(image)
    return int(h), int(w)


def _as_boxes(target: Target, hw: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=hw)


def resized_hw(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) of DETR's resize: shorter side to ``size`` unless that makes the longer side exceed
    ``max_size``, in which case the longer side becomes ``max_size``; aspect ratio kept."""
    scale = size / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Mirror image and boxes with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        hw = _hw(image)
        target = dict(target)
        target["boxes"] = F.horizontal_flip(_as_boxes(target, hw)).as_subclass(torch.Tensor)
        return F.horizontal_flip(image), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize so the shorter side is a random element of ``sizes`` (longer side capped at ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        h, w = _hw(image)
        new_hw = resized_hw(h, w, size, self.max_size)
        target = dict(target)
        target["boxes"] = F.resize(_as_boxes(target, (h, w)), list(new_hw)).as_subclass(torch.Tensor)
        if "area" in target:
            target["area"] = target["area"] * (new_hw[0] * new_hw[1] / (h * w))
        target["size"] = torch.tensor(new_hw, dtype=torch.int64)
        return F.resize(image, list(new_hw), antialias=True), target

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose width and height are uniform in [min_size, max_size] (bounded by the image);
    boxes are clipped to the crop and those left with no area are dropped."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        h, w = _hw(image)
        ch = int(torch.randint(min(self.min_size, h), min(h, self.max_size) + 1, ()))
        cw = int(torch.randint(min(self.min_size, w), min(w, self.max_size) + 1, ()))
        top = int(torch.randint(h - ch + 1, ()))
        left = int(torch.randint(w - cw + 1, ()))
        return crop(image, target, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


def crop(image: Any, target: Target, top: int, left: int, height: int, width: int) -> tuple[Any, Target]:
    """Crop image and boxes to the window; boxes are clipped and those left empty are dropped. ``area``
    shrinks in proportion to the visible part of each box."""
    hw = _hw(image)
    target = dict(target)
    old = target["boxes"]
    boxes = F.crop(_as_boxes(target, hw), top, left, height, width).as_subclass(torch.Tensor)
    # Clip explicitly (independent of the tv_tensors clamping mode).
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)],
        dim=1,
    ) if len(boxes) else boxes.reshape(0, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "area" in target and len(old):
        old_area = ((old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1])).clamp(min=1e-12)
        new_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        target["area"] = target["area"] * (new_area / old_area)
    target["boxes"] = boxes
    for key in _PER_BOX_KEYS:
        if key in target:
            target[key] = target[key][keep]
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return F.crop(image, top, left, height, width), target


class RandomSelect:
    """Apply ``t1`` with probability ``p``, otherwise ``t2``."""

    def __init__(self, t1: Transform, t2: Transform, p: float = 0.5) -> None:
        self.t1, self.t2, self.p = t1, t2, p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if torch.rand(()) < self.p:
            return self.t1(image, target)
        return self.t2(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.t1!r}, {self.t2!r}, p={self.p})"


class ToTensorNormalize:
    """Image -> float32 tensor in [0, 1] normalised by ``mean``/``std``; boxes -> cxcywh divided by the final
    (w, h); ``size`` set to the final [h, w]."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Any, target: Target) -> tuple[torch.Tensor, Target]:
        img = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        img = F.normalize(img, self.mean, self.std).as_subclass(torch.Tensor)
        h, w = img.shape[-2:]
        target = dict(target)
        boxes = target["boxes"].to(torch.float32)
        cxcywh = torch.stack(
            [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
             boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]],
            dim=1,
        ) if len(boxes) else boxes.reshape(0, 4)
        target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        return img, target

    def __repr__(self) -> str:
        return f"ToTensorNormalize(mean={self.mean}, std={self.std})"


#: DETR's training scales (shorter side), its longer-side cap and its evaluation scale (Carion et al., A.4).
COCO_SCALES = list(range(480, 801, 32))
COCO_MAX_SIZE = 1333
COCO_VAL_SCALE = 800
#: The random-crop branch at DETR's resolution: first resize, then a crop of side in [min, max].
COCO_CROP_SCALES = (400, 500, 600)
COCO_CROP_SIZE = (384, 600)


def _positive_ints(values: Any, key: str, count: int | None = None) -> tuple[int, ...]:
    ok = isinstance(values, list | tuple) and len(values) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok or (count is not None and len(values) != count):
        what = f"{count} positive integers" if count is not None else "a non-empty list of positive integers"
        raise ValueError(f"{key} must be {what}, got {values!r}")
    return tuple(values)


@dataclass(frozen=True)
class Resolution:
    """Input sizes of the ``coco`` preset (config keys ``data.<field>``).

    ``scales``: training shorter-side choices (one drawn per image); ``max_size``: cap on the longer side
    (None: no cap), for training and evaluation; ``val_scale``: evaluation shorter side. The random-crop
    branch resizes to one of ``crop_scales``, crops a window whose sides are drawn from ``crop_size``
    ([min, max]) and resizes to ``scales`` again; left at None they are DETR's (400, 500, 600) and
    (384, 600) multiplied by ``max(scales) / 800``, i.e. DETR's numbers at COCO's resolution and the same
    proportions at any other."""

    scales: tuple[int, ...] = field(default_factory=lambda: tuple(COCO_SCALES))
    max_size: int | None = COCO_MAX_SIZE
    val_scale: int = COCO_VAL_SCALE
    crop_scales: tuple[int, ...] | None = None
    crop_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", _positive_ints(self.scales, "data.scales"))
        if self.max_size is not None:
            _positive_ints([self.max_size], "data.max_size")
        _positive_ints([self.val_scale], "data.val_scale")
        if self.crop_scales is not None:
            object.__setattr__(self, "crop_scales", _positive_ints(self.crop_scales, "data.crop_scales"))
        if self.crop_size is not None:
            size = _positive_ints(self.crop_size, "data.crop_size", count=2)
            if size[0] > size[1]:
                raise ValueError(f"data.crop_size must be [min, max] with min <= max, got {list(size)}")
            object.__setattr__(self, "crop_size", size)

    def crop_branch(self) -> tuple[list[int], tuple[int, int]]:
        """(first resize's shorter-side choices, [min, max] crop side) of the random-crop branch."""
        ratio = max(self.scales) / max(COCO_SCALES)
        scales = self.crop_scales or tuple(max(1, round(s * ratio)) for s in COCO_CROP_SCALES)
        size = self.crop_size or (max(1, round(COCO_CROP_SIZE[0] * ratio)), max(1, round(COCO_CROP_SIZE[1] * ratio)))
        return list(scales), (int(size[0]), int(size[1]))


@TRANSFORMS.register("coco")
def coco_transforms(train: bool, resolution: Resolution | None = None) -> Transform:
    """DETR's COCO augmentation (Carion et al., ECCV 2020, Appendix A.4) at ``resolution`` (default:
    DETR's)."""
    res = resolution or Resolution()
    if train:
        crop_scales, (crop_min, crop_max) = res.crop_branch()
        return Compose(
            [
                RandomHorizontalFlip(),
                RandomSelect(
                    RandomResize(res.scales, max_size=res.max_size),
                    Compose(
                        [
                            RandomResize(crop_scales),
                            RandomSizeCrop(crop_min, crop_max),
                            RandomResize(res.scales, max_size=res.max_size),
                        ]
                    ),
                ),
                ToTensorNormalize(),
            ]
        )
    return Compose([RandomResize([res.val_scale], max_size=res.max_size), ToTensorNormalize()])


@TRANSFORMS.register("shapes")
def shapes_transforms(train: bool, resolution: Resolution | None = None) -> Transform:
    """Synthetic shapes: horizontal flip when training, no resizing (``resolution`` is not used)."""
    if train:
        return Compose([RandomHorizontalFlip(), ToTensorNormalize()])
    return Compose([ToTensorNormalize()])


def build_transforms(preset: str, train: bool, resolution: Resolution | None = None) -> Transform:
    """The ``preset`` pipeline (see :data:`TRANSFORMS`.names()) for training or evaluation, at
    ``resolution`` where the preset resizes (default: DETR's COCO sizes)."""
    return TRANSFORMS.build(preset, train, resolution)
