"""Built-in synthetic detection dataset ("shapes"), written to disk as a real COCO-format dataset.

Each image has a textured background (random base colour, a gentle linear gradient and pixel noise),
``min_objects`` to ``max_objects`` annotated shapes of three classes (rectangle, ellipse, triangle) and 0 to
``max_distractors`` unannotated distractors (thin lines, small crosses, dots). Every object's box is the tight
box of the pixels it covers (from a per-object mask), so the annotation matches the drawing exactly.

Object sizes are fractions of the image: a shape's scale is drawn from ``[min_rel_size, max_rel_size]`` times
the shorter image side, stretched by an aspect ratio in [1/2, 2], and each side is then clipped to
``[min_rel_size, max_rel_side]`` times the image width (height). A placement is rejected if its box overlaps an
earlier object's with IoU > 0.3, or if it would hide more than 30 % of an earlier object's pixels. The defaults
(12 % to 50 %, sides up to 60 %, 1 to 5 objects) are the original dataset, reproduced byte for byte. Dense
small-object variants (e.g. ``configs/shapes_small.yaml``: 4 to 20 objects of 8 to 24 px in 128 px images)
set ``strict_boxes``, which applies the size range and the IoU cap to the annotated (tight pixel) boxes
themselves, not only to the sampled real-valued placement boxes, whose rasterised extent differs by up to a
pixel per side (a large fraction of an 8 px object).

The output is ``root/<split>/<id:06d>.png`` plus ``root/annotations/instances_<split>.json``, so the synthetic
path goes through exactly the same pycocotools loading and COCO evaluation code as COCO itself.

CLI: ``python -m detr_ot.data.shapes --root datasets/shapes --num-train 2000 --num-val 200`` (see ``--help``
for the object count and size flags).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CATEGORIES",
    "GENERATOR_DEFAULTS",
    "GENERATOR_VERSION",
    "ensure_shapes_dataset",
    "generate_shapes",
    "render_image",
    "shapes_options",
]

#: Bump when the rendering changes, so cached datasets made by an older generator are rebuilt.
GENERATOR_VERSION = 1

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]

_MAX_IOU = 0.3  # reject a placement whose IoU with an already placed object exceeds this
_REQUIRED_PLACEMENT_TRIES = 1000  # tries for each of the first min_objects objects (the others: placement_tries)
_MIN_VISIBLE = 0.7  # every object keeps at least this fraction of its pixels visible
_MIN_BG_CONTRAST = 110.0  # minimum RGB L2 distance between an object's colour and the background base colour
_MIN_OBJ_CONTRAST = 70.0  # ... and between objects of the same image (where achievable)
_NOISE_STD = 5.0
_GRADIENT_AMPLITUDE = 12.0

#: Generator options beyond image count, seed and image size, with the values that reproduce the original
#: dataset. ``ensure_shapes_dataset`` keys its cache on the ones that differ from these, so a dataset generated
#: before an option existed (i.e. with its default) stays valid.
GENERATOR_DEFAULTS: dict[str, Any] = {
    "min_objects": 1,
    "max_distractors": 2,
    "min_rel_size": 0.12,
    "max_rel_size": 0.5,
    "max_rel_side": 0.6,
    "placement_tries": 30,
    "strict_boxes": False,
}


def _iou_xywh(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU between one (x, y, w, h) box and an (N, 4) array of them."""
    if len(others) == 0:
        return np.zeros(0)
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2])
    y1 = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box[2] * box[3] + others[:, 2] * others[:, 3] - inter
    return inter / union


def _contrasting_colour(
    rng: np.random.Generator, background: np.ndarray, others: Sequence[np.ndarray]
) -> np.ndarray:
    """A random RGB colour at least ``_MIN_BG_CONTRAST`` from the background and, where possible,
    ``_MIN_OBJ_CONTRAST`` from the colours in ``others``."""
    best, best_score = None, -np.inf
    for _ in range(64):
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        d_bg = np.linalg.norm(colour - background)
        if d_bg < _MIN_BG_CONTRAST:
            continue
        d_obj = min((np.linalg.norm(colour - o) for o in others), default=np.inf)
        if d_obj >= _MIN_OBJ_CONTRAST:
            return colour
        if d_obj > best_score:
            best, best_score = colour, d_obj
    if best is not None:
        return best
    # Background in the middle of the cube: the farthest corner is always > 110 away.
    return np.where(background < 128, 255.0, 0.0)


def _shape_polygon(x0: float, y0: float, w: float, h: float, rng: np.random.Generator) -> list:
    """Vertices of a triangle whose tight box is (x0, y0, w, h): one side of the box is the base, the
    apex lies on the opposite side."""
    x1, y1 = x0 + w, y0 + h
    t = rng.uniform(0.0, 1.0)
    orientation = rng.integers(4)
    if orientation == 0:  # apex up
        return [(x0, y1), (x1, y1), (x0 + t * w, y0)]
    if orientation == 1:  # apex down
        return [(x0, y0), (x1, y0), (x0 + t * w, y1)]
    if orientation == 2:  # apex left
        return [(x1, y0), (x1, y1), (x0, y0 + t * h)]
    return [(x0, y0), (x0, y1), (x1, y0 + t * h)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, xy: tuple, poly: list | None, fill: Any) -> None:
    if kind == 1:
        draw.rectangle(xy, fill=fill)
    elif kind == 2:
        draw.ellipse(xy, fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _draw_distractor(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, colour: tuple
) -> None:
    """Thin line, small cross or dot: unlike the three annotated classes, which are filled shapes."""
    kind = rng.integers(3)
    side = min(w, h)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    if kind == 0:
        length = rng.uniform(0.2, 0.6) * side
        angle = rng.uniform(0, np.pi)
        dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=int(rng.integers(1, 3)))
    elif kind == 1:
        r = rng.uniform(2.5, 4.5)
        draw.line([(cx - r, cy), (cx + r, cy)], fill=colour, width=1)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=colour, width=1)
    else:
        r = rng.uniform(1.0, 2.0)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def render_image(
    rng: np.random.Generator,
    min_size: int = 96,
    max_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 5,
    max_distractors: int = 2,
    min_rel_size: float = 0.12,
    max_rel_size: float = 0.5,
    max_rel_side: float = 0.6,
    placement_tries: int = 30,
    strict_boxes: bool = False,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render one image; returns (uint8 array (H, W, 3), objects) where each object is
    ``{"category_id", "bbox": [x, y, w, h] (tight box of its mask), "area": mask pixel count}``.

    The number of objects is drawn from ``[min_objects, max_objects]``. Each of the first ``min_objects`` gets
    up to ``_REQUIRED_PLACEMENT_TRIES`` placements (RuntimeError if none is admissible: the objects are too
    large or too many for the image); any further object is left out after ``placement_tries`` rejected
    placements. With ``strict_boxes`` the tight box's sides must lie in ``[min_rel_size, max_rel_side]`` times
    the image width (height) and its IoU with every earlier tight box must not exceed the cap; triangles are
    then drawn inside the same inclusive pixel corners as rectangles and ellipses (the original generator lets
    a triangle's tight box exceed its sampled size by one pixel)."""
    width = int(rng.integers(min_size, max_size + 1))
    height = int(rng.integers(min_size, max_size + 1))
    side = min(width, height)

    background = rng.integers(0, 256, size=3).astype(np.float64)
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(canvas)

    # Distractors first, so they never hide an annotated object.
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        colour = _contrasting_colour(rng, background, [])
        _draw_distractor(draw, rng, width, height, tuple(int(c) for c in colour))

    objects: list[dict[str, Any]] = []
    placed = np.zeros((0, 4))
    colours: list[np.ndarray] = []
    tight_boxes = np.zeros((0, 4))  # the annotated boxes so far (strict_boxes)
    inset = 1.0 if strict_boxes else 0.0  # triangle vertices on the inclusive pixel corners, like the others
    owner = np.zeros((height, width), dtype=np.int32)  # 1 + index of the object seen at each pixel, 0 = none
    for index in range(int(rng.integers(min_objects, max_objects + 1))):
        kind = int(rng.integers(1, len(CATEGORIES) + 1))
        required = index < min_objects
        tries = max(placement_tries, _REQUIRED_PLACEMENT_TRIES) if required else placement_tries
        for _try in range(tries):
            scale = rng.uniform(min_rel_size, max_rel_size) * side
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            bw = float(np.clip(scale * np.sqrt(aspect), min_rel_size * width, max_rel_side * width))
            bh = float(np.clip(scale / np.sqrt(aspect), min_rel_size * height, max_rel_side * height))
            x0 = rng.uniform(0, width - bw)
            y0 = rng.uniform(0, height - bh)
            box = np.array([x0, y0, bw, bh])
            if (_iou_xywh(box, placed) > _MAX_IOU).any():
                continue
            poly = _shape_polygon(x0, y0, bw - inset, bh - inset, rng) if kind == 3 else None
            # PIL's rectangle/ellipse take inclusive pixel corners.
            xy = (x0, y0, x0 + bw - 1, y0 + bh - 1)
            mask_img = Image.new("L", (width, height), 0)
            _draw_shape(ImageDraw.Draw(mask_img), kind, xy, poly, 255)
            if strict_boxes:
                pixel_box = mask_img.getbbox()
                if pixel_box is None:
                    continue
                left, top, right, bottom = pixel_box
                tight = np.array([left, top, right - left, bottom - top], dtype=np.float64)
                if not (
                    min_rel_size * width <= tight[2] <= max_rel_side * width
                    and min_rel_size * height <= tight[3] <= max_rel_side * height
                ):
                    continue
                if (_iou_xywh(tight, tight_boxes) > _MAX_IOU).any():
                    continue
            mask = np.asarray(mask_img) > 0
            new_owner = np.where(mask, len(objects) + 1, owner)
            visible = np.bincount(new_owner.ravel(), minlength=len(objects) + 2)[1 : len(objects) + 1]
            areas = np.array([o["area"] for o in objects])
            if mask.any() and (visible >= _MIN_VISIBLE * areas).all():
                break
        else:
            if required:
                raise RuntimeError(
                    f"no admissible placement for object {index + 1} of min_objects={min_objects} in a "
                    f"{width}x{height} image after {tries} tries: lower min_objects or the object sizes "
                    f"(min_rel_size={min_rel_size}, max_rel_size={max_rel_size}, max_rel_side={max_rel_side})"
                )
            continue  # no admissible placement for this optional object: leave it out
        owner = new_owner
        colour = _contrasting_colour(rng, background, colours)
        _draw_shape(draw, kind, xy, poly, tuple(int(c) for c in colour))
        placed = np.vstack([placed, box])
        colours.append(colour)
        left, top, right, bottom = mask_img.getbbox()  # right/lower exclusive: the tight pixel box
        bbox = [float(left), float(top), float(right - left), float(bottom - top)]
        tight_boxes = np.vstack([tight_boxes, bbox])
        objects.append({"category_id": kind, "bbox": bbox, "area": float(mask.sum())})

    # Texture over the whole image: a gentle linear gradient plus pixel noise.
    pixels = np.asarray(canvas, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5)) * 2.0
    gradient = rng.uniform(-_GRADIENT_AMPLITUDE, _GRADIENT_AMPLITUDE, size=3).astype(np.float32)
    pixels += ramp[..., None] * gradient
    pixels += rng.normal(0.0, _NOISE_STD, size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects


def generate_shapes(
    root: Path,
    split: str,
    num_images: int,
    seed: int,
    min_size: int = 96,
    max_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 5,
    max_distractors: int = 2,
    *,
    min_rel_size: float = 0.12,
    max_rel_size: float = 0.5,
    max_rel_side: float = 0.6,
    placement_tries: int = 30,
    strict_boxes: bool = False,
) -> Path:
    """Write ``num_images`` images to ``root/<split>/<id:06d>.png`` (ids from 1) and their COCO annotations to
    ``root/annotations/instances_<split>.json``; returns the annotation file path. The object options are those
    of :func:`render_image`.

    Deterministic: image ``i`` is drawn from ``np.random.default_rng([seed, i])``, so the output depends only
    on the arguments (not on the order or number of other images)."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if max_distractors < 0:
        raise ValueError(f"need max_distractors >= 0, got {max_distractors}")
    if not 0 < min_rel_size <= max_rel_size:
        raise ValueError(f"need 0 < min_rel_size <= max_rel_size, got {min_rel_size}, {max_rel_size}")
    if not min_rel_size <= max_rel_side <= 1:
        raise ValueError(f"need min_rel_size <= max_rel_side <= 1, got {min_rel_size}, {max_rel_side}")
    if placement_tries < 1:
        raise ValueError(f"need placement_tries >= 1, got {placement_tries}")
    root = Path(root)
    img_dir = root / split
    ann_dir = root / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([int(seed), index])
        pixels, objects = render_image(
            rng, min_size, max_size, min_objects, max_objects, max_distractors, min_rel_size, max_rel_size,
            max_rel_side, placement_tries, strict_boxes,
        )
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(img_dir / file_name, compress_level=1)
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})

    dataset = {
        "info": {"description": "detr_ot synthetic shapes", "version": str(GENERATOR_VERSION), "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    ann_file = ann_dir / f"instances_{split}.json"
    ann_file.write_text(json.dumps(dataset))
    return ann_file


def _split_seed(seed: int, index: int) -> int:
    """Independent per-split seed derived from the dataset seed."""
    return int(np.random.SeedSequence([int(seed), 1_000_003, index]).generate_state(1)[0])


def ensure_shapes_dataset(
    root: Path,
    num_train: int,
    num_val: int,
    seed: int,
    min_size: int = 96,
    max_size: int = 128,
    max_objects: int = 5,
    split_names: tuple[str, str] = ("train", "val"),
    **options: Any,
) -> Path:
    """Generate the shapes dataset under ``root`` unless it is already there with the same parameters.

    ``options`` are the object options of :func:`render_image` (names and defaults in ``GENERATOR_DEFAULTS``).
    The parameters are stored in ``root/params.json``; if they differ the dataset is rebuilt (options are
    stored only where they differ from their defaults, so datasets made before an option existed stay valid
    and a changed option regenerates). Generation
    writes into a temporary directory next to ``root`` and renames it into place, so an interrupted
    generation never leaves a half-written dataset. A non-empty ``root`` without ``params.json`` is not
    touched (FileExistsError). Returns ``root``."""
    root = Path(root)
    unknown = sorted(set(options) - set(GENERATOR_DEFAULTS))
    if unknown:
        raise TypeError(f"ensure_shapes_dataset: unknown option(s) {unknown}; valid: {sorted(GENERATOR_DEFAULTS)}")
    options = {k: _option_value(k, v) for k, v in options.items()}
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
        "min_size": int(min_size),
        "max_size": int(max_size),
        "max_objects": int(max_objects),
        "split_names": list(split_names),
        **{k: v for k, v in options.items() if v != GENERATOR_DEFAULTS[k]},
    }
    if _read_params(root) == params:
        return root
    if root.exists() and not (root / "params.json").is_file() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists, is not empty and has no params.json, so it is not a generated shapes dataset; "
            "remove it or point data.root elsewhere"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for index, (split, count) in enumerate(zip(split_names, (num_train, num_val), strict=True)):
            generate_shapes(
                tmp, split, count, _split_seed(seed, index),
                min_size=min_size, max_size=max_size, max_objects=max_objects, **options,
            )
        (tmp / "params.json").write_text(json.dumps(params, indent=2))
        _swap_into_place(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _option_value(name: str, value: Any) -> Any:
    """``value`` as a plain Python value of the type of the option's default (so params.json compares equal)."""
    kind = type(GENERATOR_DEFAULTS[name])
    if kind is bool:
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"shapes option {name} must be true or false, got {value!r}")
        return bool(value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"shapes option {name} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise TypeError(f"shapes option {name} must be an integer, got {value!r}")
    return kind(value)


def shapes_options(shapes_cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`ensure_shapes_dataset` from a ``data.shapes`` config section: the image size,
    object count and object options that ``shapes_cfg`` has (a missing one keeps its default)."""
    names = ("min_size", "max_size", "max_objects", *GENERATOR_DEFAULTS)
    return {name: getattr(shapes_cfg, name) for name in names if hasattr(shapes_cfg, name)}


def _read_params(root: Path) -> dict | None:
    try:
        return json.loads((root / "params.json").read_text())
    except (OSError, ValueError):
        return None


def _swap_into_place(tmp: Path, root: Path, params: dict) -> None:
    """Rename ``tmp`` to ``root``, moving an outdated ``root`` aside first. Tolerates a concurrent process
    (e.g. another DDP rank) having put an identical dataset in place meanwhile."""
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}-{tmp.name[-8:]}")
        try:
            os.rename(root, old)
        except FileNotFoundError:  # removed by a concurrent process
            old = None
    try:
        os.rename(tmp, root)
    except OSError:
        if _read_params(root) != params:  # not a concurrent identical generation: a real failure
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes dataset in COCO format.")
    parser.add_argument("--root", type=Path, default=Path("datasets/shapes"))
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=96)
    parser.add_argument("--max-size", type=int, default=128)
    parser.add_argument("--min-objects", type=int, default=GENERATOR_DEFAULTS["min_objects"])
    parser.add_argument("--max-objects", type=int, default=5)
    parser.add_argument("--max-distractors", type=int, default=GENERATOR_DEFAULTS["max_distractors"])
    parser.add_argument("--min-rel-size", type=float, default=GENERATOR_DEFAULTS["min_rel_size"],
                        help="smallest object scale and side, as a fraction of the image side")
    parser.add_argument("--max-rel-size", type=float, default=GENERATOR_DEFAULTS["max_rel_size"],
                        help="largest object scale (before the aspect ratio), as a fraction of the shorter side")
    parser.add_argument("--max-rel-side", type=float, default=GENERATOR_DEFAULTS["max_rel_side"],
                        help="largest object side, as a fraction of the image width (height)")
    parser.add_argument("--placement-tries", type=int, default=GENERATOR_DEFAULTS["placement_tries"],
                        help="placements tried before an object beyond --min-objects is left out")
    parser.add_argument("--strict-boxes", action="store_true",
                        help="apply the size range and the IoU cap to the annotated tight pixel boxes")
    parser.add_argument("--split-names", nargs=2, default=["train", "val"], metavar=("TRAIN", "VAL"))
    args = parser.parse_args(argv)
    root = ensure_shapes_dataset(
        args.root, args.num_train, args.num_val, args.seed,
        min_size=args.min_size, max_size=args.max_size, max_objects=args.max_objects,
        split_names=tuple(args.split_names),
        **{name: getattr(args, name) for name in GENERATOR_DEFAULTS},
    )
    print(f"shapes dataset ready at {root} ({args.num_train} train / {args.num_val} val images)")


if __name__ == "__main__":
    main()
