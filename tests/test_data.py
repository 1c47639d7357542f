"""Data package: synthetic generator, COCO loading and validation, transforms, collation, builders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from detr_ot.data import shapes as shapes_mod
from detr_ot.data.build import build_dataset, build_loader
from detr_ot.data.coco import AnnotationError, CocoDetection
from detr_ot.data.collate import collate_batch
from detr_ot.data.shapes import ensure_shapes_dataset, generate_shapes
from detr_ot.data.transforms import (
    COCO_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    Resolution,
    ToTensorNormalize,
    build_transforms,
)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _shapes_cfg(root: Path, **kw) -> SimpleNamespace:
    shapes = SimpleNamespace(num_train=12, num_val=6, seed=3, min_size=96, max_size=128, max_objects=5)
    base = dict(dataset="shapes", root=str(root), train_split="train", val_split="val", transforms="shapes",
                shapes=shapes)
    base.update(kw)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------------------------------
# Synthetic generator


def test_generator_is_deterministic_by_seed(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", "train", 8, seed=5)
    b = generate_shapes(tmp_path / "b", "train", 8, seed=5)
    c = generate_shapes(tmp_path / "c", "train", 8, seed=6)
    assert a.read_text() == b.read_text()
    assert a.read_text() != c.read_text()
    for name in sorted(p.name for p in (tmp_path / "a" / "train").iterdir()):
        assert np.array_equal(_pixels(tmp_path / "a/train" / name), _pixels(tmp_path / "b/train" / name))
    assert not np.array_equal(
        _pixels(tmp_path / "a" / "train" / "000001.png"), _pixels(tmp_path / "c" / "train" / "000001.png")
    )


def test_generated_dataset_is_valid_coco(tmp_path: Path) -> None:
    ann_file = generate_shapes(tmp_path, "val", 20, seed=0, min_size=96, max_size=128, max_objects=5)
    assert ann_file == tmp_path / "annotations" / "instances_val.json"
    coco = COCO(str(ann_file))  # independent loader
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    assert [coco.cats[i]["name"] for i in (1, 2, 3)] == ["rectangle", "ellipse", "triangle"]
    assert len(coco.getImgIds()) == 20
    sizes = set()
    for img_id in coco.getImgIds():
        info = coco.imgs[img_id]
        assert info["file_name"] == f"{img_id:06d}.png"
        h, w = _pixels(tmp_path / "val" / info["file_name"]).shape[:2]
        assert (w, h) == (info["width"], info["height"])
        assert 96 <= w <= 128 and 96 <= h <= 128
        sizes.add((h, w))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 5
        for ann in anns:
            x, y, bw, bh = ann["bbox"]
            assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3)
            assert x >= 0 and y >= 0 and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            assert min(bw, bh) >= 0.1 * min(w, h) - 1  # objects are not tiny
            assert 0 < ann["area"] <= bw * bh
    assert len(sizes) > 1  # varied image sizes, so batches need padding
    cats = [a["category_id"] for a in coco.dataset["annotations"]]
    assert set(cats) == {1, 2, 3}


def test_generated_boxes_are_tight_boxes_of_the_drawn_pixels(tmp_path: Path, monkeypatch) -> None:
    # Without texture the background is one flat colour, so the drawn object is every other pixel.
    monkeypatch.setattr(shapes_mod, "_NOISE_STD", 0.0)
    monkeypatch.setattr(shapes_mod, "_GRADIENT_AMPLITUDE", 0.0)
    ann_file = generate_shapes(tmp_path, "t", 24, seed=1, min_objects=1, max_objects=1, max_distractors=0)
    data = json.loads(ann_file.read_text())
    assert len(data["annotations"]) == 24
    kinds = set()
    for ann in data["annotations"]:
        px = _pixels(tmp_path / "t" / f"{ann['image_id']:06d}.png").astype(np.int64)
        colours, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
        assert len(colours) == 2  # background + object
        fg = np.any(px != colours[counts.argmax()], axis=-1)
        ys, xs = np.nonzero(fg)
        expected = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["bbox"] == pytest.approx(expected)
        assert ann["area"] == fg.sum()
        kinds.add(ann["category_id"])
    assert kinds == {1, 2, 3}


def test_ensure_shapes_dataset_caches_regenerates_and_is_atomic(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "shapes"
    ensure_shapes_dataset(root, 6, 3, seed=0, min_size=96, max_size=112, max_objects=3)
    params = json.loads((root / "params.json").read_text())
    assert params["num_train"] == 6 and params["split_names"] == ["train", "val"]
    assert len(list((root / "train").iterdir())) == 6 and len(list((root / "val").iterdir())) == 3
    # Train and val are drawn with different seeds.
    assert not np.array_equal(_pixels(root / "train" / "000001.png"), _pixels(root / "val" / "000001.png"))

    real_generate = shapes_mod.generate_shapes

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated although the parameters are unchanged")

    monkeypatch.setattr(shapes_mod, "generate_shapes", must_not_run)
    ensure_shapes_dataset(root, 6, 3, seed=0, min_size=96, max_size=112, max_objects=3)

    # An interrupted regeneration leaves the previous dataset intact and no temporary folder behind.
    def interrupted(root_, split, *args, **kwargs):
        if split == "val":
            raise KeyboardInterrupt
        return real_generate(root_, split, *args, **kwargs)

    monkeypatch.setattr(shapes_mod, "generate_shapes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset(root, 8, 3, seed=0, min_size=96, max_size=112, max_objects=3)
    assert json.loads((root / "params.json").read_text()) == params
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]

    monkeypatch.setattr(shapes_mod, "generate_shapes", real_generate)
    ensure_shapes_dataset(root, 8, 3, seed=0, min_size=96, max_size=112, max_objects=3)
    assert json.loads((root / "params.json").read_text())["num_train"] == 8
    assert len(list((root / "train").iterdir())) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="params.json"):
        ensure_shapes_dataset(foreign, 2, 2, seed=0)
    assert (foreign / "precious.txt").exists()


def test_shapes_cli(tmp_path: Path) -> None:
    shapes_mod.main(["--root", str(tmp_path / "s"), "--num-train", "3", "--num-val", "2"])
    assert len(json.loads((tmp_path / "s/annotations/instances_val.json").read_text())["images"]) == 2


# ----------------------------------------------------------------------------------------------------
# COCO dataset: loading, validation, targets


def _write_dataset(root: Path, images=None, annotations=None, categories=None, write_images=True):
    """A tiny COCO dataset: two images (60x40 and 50x50) under root/img, annotation file root/ann.json."""
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": 60, "height": 40},
        {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
    ]
    annotations = annotations if annotations is not None else [
        {"id": 7, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
    ]
    if categories is None:
        categories = [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}]
    (root / "img").mkdir(parents=True, exist_ok=True)
    if write_images:
        for img in images:
            size = (img["width"], img["height"])
            Image.new("RGB", size, (10, 20, 30)).save(root / "img" / img["file_name"])
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root / "img", ann_file


def test_missing_annotation_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "img", tmp_path / "nope.json")


def test_malformed_json(tmp_path: Path) -> None:
    img_dir, ann_file = _write_dataset(tmp_path)
    ann_file.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="ann.json") as err:
        CocoDetection(img_dir, ann_file)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "bbox, what",
    [([10, 5, -3, 10], "non-positive"), ([10, 5, 20, 0], "non-positive"), ([10, 5, 20], "malformed"),
     ("10 5 20 10", "malformed"), ([10, 5, float("nan"), 10], "malformed")],
)
def test_bad_bbox_names_file_annotation_and_image(tmp_path: Path, bbox, what) -> None:
    anns = [
        {"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 42, "image_id": 2, "category_id": 5, "bbox": bbox, "area": 25, "iscrowd": 0},
    ]
    img_dir, ann_file = _write_dataset(tmp_path, annotations=anns)
    with pytest.raises(AnnotationError) as err:
        CocoDetection(img_dir, ann_file)
    msg = str(err.value)
    assert str(ann_file) in msg and "annotation id 42" in msg and "image id 2" in msg and what in msg


def test_unknown_category_id(tmp_path: Path) -> None:
    anns = [{"id": 9, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    img_dir, ann_file = _write_dataset(tmp_path, annotations=anns)
    with pytest.raises(AnnotationError) as err:
        CocoDetection(img_dir, ann_file)
    msg = str(err.value)
    assert str(ann_file) in msg and "annotation id 9" in msg and "category id 99" in msg


def test_annotation_of_unknown_image(tmp_path: Path) -> None:
    anns = [{"id": 9, "image_id": 77, "category_id": 3, "bbox": [1, 1, 5, 5]}]
    img_dir, ann_file = _write_dataset(tmp_path, annotations=anns)
    with pytest.raises(AnnotationError, match="annotation id 9 refers to image id 77"):
        CocoDetection(img_dir, ann_file)


def test_image_missing_on_disk(tmp_path: Path) -> None:
    img_dir, ann_file = _write_dataset(tmp_path)
    (img_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        CocoDetection(img_dir, ann_file)
    msg = str(err.value)
    assert "b.png" in msg and str(ann_file) in msg and "a.png" not in msg


def test_missing_image_folder(tmp_path: Path) -> None:
    _, ann_file = _write_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        CocoDetection(tmp_path / "elsewhere", ann_file)


def test_crowd_boxes_excluded_in_train_mode_only(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
    ]
    img_dir, ann_file = _write_dataset(tmp_path, annotations=anns)
    _, train_target = CocoDetection(img_dir, ann_file, train=True)[0]
    assert train_target["labels"].tolist() == [0] and train_target["iscrowd"].tolist() == [0]
    assert train_target["boxes"].tolist() == [[10, 5, 30, 15]]  # xyxy, absolute, no transforms
    _, val_target = CocoDetection(img_dir, ann_file, train=False)[0]
    assert val_target["labels"].tolist() == [0, 1] and val_target["iscrowd"].tolist() == [0, 1]


def test_category_mapping_round_trip_clipping_and_empty_images(tmp_path: Path) -> None:
    cats = [{"id": 42, "name": "c"}, {"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 42, "bbox": [50, 30, 20, 20]},  # runs past the 60x40 image
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [70, 10, 5, 5]},  # entirely outside: dropped
    ]
    img_dir, ann_file = _write_dataset(tmp_path, annotations=anns, categories=cats)
    ds = CocoDetection(img_dir, ann_file)
    assert ds.label_to_cat_id == [3, 7, 42] and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert ds.cat_id_to_label == {3: 0, 7: 1, 42: 2}
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in (3, 7, 42))
    assert ds.ids == [1, 2] and len(ds) == 2
    image, target = ds[0]
    assert image.size == (60, 40) and target["image_id"] == 1
    assert target["orig_size"].tolist() == [40, 60]
    assert [ds.label_to_cat_id[int(lab)] for lab in target["labels"]] == [42, 3]
    assert target["boxes"].tolist() == [[50, 30, 60, 40], [1, 2, 4, 6]]
    assert target["area"].tolist() == [400, 12]  # filled in from the box when absent
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["labels"].dtype == torch.int64


def test_contract_dtypes_after_transforms(tmp_path: Path) -> None:
    img_dir, ann_file = _write_dataset(tmp_path)
    ds = CocoDetection(img_dir, ann_file, transforms=build_transforms("shapes", train=False), train=True)
    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["area"].dtype == torch.float32 and t["iscrowd"].dtype == torch.int64
    assert t["orig_size"].dtype == torch.int64 and t["size"].tolist() == [40, 60]
    # [10, 5, 20, 10] xywh in a 60x40 image -> cxcywh / (w, h, w, h)
    assert t["boxes"].tolist()[0] == pytest.approx([20 / 60, 10 / 40, 20 / 60, 10 / 40])
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    expected = (torch.tensor([10, 20, 30.0])[:, None, None] / 255 - mean) / std
    assert torch.allclose(image, expected.expand(3, 40, 60), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Transforms


def _target(boxes_xyxy, h, w):
    boxes = torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "boxes": boxes, "labels": torch.arange(n), "image_id": 1,
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w]),
    }


def test_horizontal_flip_maps_cx_to_one_minus_cx() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    target = _target([[3, 4, 20, 30], [40, 0, 53, 37]], 37, 53)
    plain_img, plain = ToTensorNormalize()(image, target)
    flipped_img, flipped = ToTensorNormalize()(*RandomHorizontalFlip(p=1.0)(image, target))
    assert torch.equal(flipped_img, plain_img.flip(-1))
    expected = plain["boxes"].clone()
    expected[:, 0] = 1 - expected[:, 0]
    assert torch.allclose(flipped["boxes"], expected, atol=1e-6)
    assert torch.equal(flipped["labels"], plain["labels"]) and flipped["size"].tolist() == [37, 53]
    _, kept = ToTensorNormalize()(*RandomHorizontalFlip(p=0.0)(image, target))
    assert torch.equal(kept["boxes"], plain["boxes"])


@pytest.mark.parametrize(
    "hw, expected",
    [((480, 640), (800, 1067)),  # shorter side to 800
     ((500, 2000), (333, 1333)),  # longer side capped at 1333
     ((1000, 200), (1333, 267)),
     ((800, 800), (800, 800))],
)
def test_coco_val_resize_shorter_side_and_max_size(hw, expected) -> None:
    h, w = hw
    image = Image.new("RGB", (w, h))
    box = [0.25 * w, 0.2 * h, 0.75 * w, 0.6 * h]
    out, t = build_transforms("coco", train=False)(image, _target([box], h, w))
    assert tuple(out.shape[1:]) == expected and t["size"].tolist() == list(expected)
    assert t["orig_size"].tolist() == [h, w]
    assert max(expected) <= 1333
    # Normalised boxes are unchanged by a pure resize (up to rounding of the output size).
    assert torch.allclose(t["boxes"], torch.tensor([[0.5, 0.4, 0.5, 0.4]]), atol=2e-3)


def test_coco_train_transforms_keep_boxes_on_the_object() -> None:
    """A white rectangle on black: after the random flip/resize/crop pipeline the box must still be the tight
    box of the white pixels (or be dropped when the crop misses it)."""
    h, w = 300, 420
    box = [150, 90, 260, 200]
    image = Image.new("RGB", (w, h))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    transform = build_transforms("coco", train=True)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    seen_sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out, t = transform(image, _target([box], h, w))
        oh, ow = out.shape[1:]
        seen_sizes.add((oh, ow))
        assert t["size"].tolist() == [oh, ow] and max(oh, ow) <= 1333
        white = ((out * std + mean).mean(0) > 0.5).nonzero()
        if len(t["boxes"]) == 0:
            assert len(white) == 0
            continue
        assert len(white) > 0
        cx, cy, bw, bh = (t["boxes"][0] * torch.tensor([ow, oh, ow, oh])).tolist()
        x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
        ys, xs = white[:, 0].float(), white[:, 1].float()
        got = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert got == pytest.approx([x0, y0, x1, y1], abs=2.5), (seed, got, [x0, y0, x1, y1])
        assert 0 <= x0 < x1 <= ow and 0 <= y0 < y1 <= oh
    assert len(seen_sizes) > 3  # multi-scale


def test_crop_drops_boxes_outside_and_filters_all_per_box_fields() -> None:
    from detr_ot.data.transforms import crop

    image = Image.new("RGB", (100, 80))
    target = _target([[0, 0, 10, 10], [50, 40, 90, 70], [45, 20, 60, 50]], 80, 100)
    _, t = crop(image, target, top=30, left=40, height=50, width=60)
    assert t["labels"].tolist() == [1, 2]
    assert t["boxes"].tolist() == [[10, 10, 50, 40], [5, 0, 20, 20]]
    assert t["iscrowd"].tolist() == [0, 0] and t["size"].tolist() == [50, 60]
    assert t["area"].tolist() == pytest.approx([1200, 300])


SMALL = Resolution(scales=(256, 288, 320, 352, 384), max_size=512, val_scale=384)


def test_default_resolution_is_detrs_recipe() -> None:
    res = Resolution()
    assert list(res.scales) == list(range(480, 801, 32)) == COCO_SCALES
    assert (res.max_size, res.val_scale) == (1333, 800)
    assert res.crop_branch() == ([400, 500, 600], (384, 600))  # Carion et al., Appendix A.4
    # Scaled with max(scales) / 800 at another resolution: 384 / 800 = 0.48.
    assert SMALL.crop_branch() == ([192, 240, 288], (184, 288))
    assert Resolution(scales=(400,), crop_scales=(10, 20), crop_size=(5, 9)).crop_branch() == ([10, 20], (5, 9))


@pytest.mark.parametrize(
    "kwargs, key",
    [(dict(scales=()), "data.scales"), (dict(scales=(256, 0)), "data.scales"), (dict(max_size=-1), "data.max_size"),
     (dict(val_scale=0), "data.val_scale"), (dict(crop_scales=(0,)), "data.crop_scales"),
     (dict(crop_size=(300, 200)), "data.crop_size"), (dict(crop_size=(300,)), "data.crop_size")],
)
def test_bad_resolution_names_the_key(kwargs, key) -> None:
    with pytest.raises(ValueError, match=key):
        Resolution(**kwargs)


def test_coco_train_pipeline_is_built_from_the_resolution() -> None:
    pipeline = build_transforms("coco", train=True, resolution=SMALL)
    flip, select, to_tensor = pipeline.transforms
    assert isinstance(flip, RandomHorizontalFlip) and isinstance(to_tensor, ToTensorNormalize)
    assert isinstance(select, RandomSelect) and select.p == 0.5
    assert isinstance(select.t1, RandomResize)
    assert (select.t1.sizes, select.t1.max_size) == ([256, 288, 320, 352, 384], 512)
    assert isinstance(select.t2, Compose)
    first, window, last = select.t2.transforms
    assert isinstance(first, RandomResize) and (first.sizes, first.max_size) == ([192, 240, 288], None)
    assert isinstance(window, RandomSizeCrop) and (window.min_size, window.max_size) == (184, 288)
    assert isinstance(last, RandomResize) and (last.sizes, last.max_size) == ([256, 288, 320, 352, 384], 512)


@pytest.mark.parametrize(
    "hw, expected",
    [((300, 400), (384, 512)),  # shorter side to 384, longer exactly at the cap
     ((100, 400), (128, 512)),  # 384 / 100 would make the longer side 1536: capped at 512
     ((500, 250), (512, 256)),
     ((384, 384), (384, 384)),
     ((30, 40), (384, 512))],  # small images are enlarged
)
def test_coco_val_resize_at_a_configured_resolution(hw, expected) -> None:
    h, w = hw
    out, t = build_transforms("coco", train=False, resolution=SMALL)(Image.new("RGB", (w, h)),
                                                                      _target([[0, 0, w / 2, h / 2]], h, w))
    assert tuple(out.shape[1:]) == expected and t["size"].tolist() == list(expected)
    assert t["orig_size"].tolist() == [h, w]


def test_coco_train_sizes_stay_within_the_configured_scales() -> None:
    """Every output has its shorter side in ``scales`` or its longer side at ``max_size`` (never above), from
    both branches of the recipe: the plain resize keeps the aspect ratio, the crop branch changes it."""
    h, w = 300, 420
    image = Image.new("RGB", (w, h))
    transform = build_transforms("coco", train=True, resolution=SMALL)
    kept_aspect = cropped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = transform(image, _target([[100, 80, 300, 220]], h, w))
        oh, ow = out.shape[1:]
        assert t["size"].tolist() == [oh, ow]
        assert max(oh, ow) <= 512
        assert min(oh, ow) in SMALL.scales or max(oh, ow) == 512, (seed, oh, ow)
        if abs(ow / oh - w / h) < 0.01:
            kept_aspect += 1
        else:
            cropped += 1
    assert kept_aspect > 5 and cropped > 5


def test_build_dataset_applies_the_configured_resolution(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    ensure_shapes_dataset(root, 4, 3, seed=0, min_size=96, max_size=128, split_names=("train", "val"))
    cfg = SimpleNamespace(dataset="coco", root=str(root), train_split="train", val_split="val", transforms="coco",
                          scales=[64, 72], max_size=100, val_scale=80)
    val = build_dataset(cfg, "val")
    for i in range(len(val)):
        image, _ = val[i]
        h, w = image.shape[1:]
        assert min(h, w) == 80 or max(h, w) == 100
    torch.manual_seed(0)
    train = build_dataset(cfg, "train")
    for i in range(len(train)):
        image, _ = train[i]
        h, w = image.shape[1:]
        assert max(h, w) <= 100 and (min(h, w) in (64, 72) or max(h, w) == 100)


def test_unknown_transform_preset() -> None:
    with pytest.raises(KeyError, match="shapes"):
        build_transforms("nope", train=True)


# ----------------------------------------------------------------------------------------------------
# Collation and builders


def test_collate_pads_to_multiple_of_32_with_mask() -> None:
    a = torch.randn(3, 50, 70)
    b = torch.randn(3, 64, 33)
    ta, tb = {"image_id": 1}, {"image_id": 2}
    images, mask, targets = collate_batch([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 64, 96) and mask.shape == (2, 64, 96) and mask.dtype == torch.bool
    assert targets == [ta, tb]
    assert torch.equal(images[0, :, :50, :70], a) and torch.equal(images[1, :, :64, :33], b)
    expected = torch.ones(2, 64, 96, dtype=torch.bool)
    expected[0, :50, :70] = False
    expected[1, :64, :33] = False
    assert torch.equal(mask, expected)
    assert images[0][:, mask[0]].abs().sum() == 0 and images[1][:, mask[1]].abs().sum() == 0
    images, mask, _ = collate_batch([(a, ta), (b, tb)], size_divisibility=1)
    assert images.shape == (2, 3, 64, 70)
    with pytest.raises(TypeError, match="transforms"):
        collate_batch([(Image.new("RGB", (4, 4)), ta)])


def test_build_dataset_and_loader_on_shapes(tmp_path: Path) -> None:
    cfg = _shapes_cfg(tmp_path / "shapes")
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    assert (len(train), len(val)) == (12, 6) and train.train and not val.train
    assert train.class_names == ["rectangle", "ellipse", "triangle"]

    loader = build_loader(train, batch_size=5, train=True, num_workers=0, seed=0)
    ids = []
    for images, mask, targets in loader:
        assert images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
        assert images.shape[0] == mask.shape[0] == len(targets)
        ids += [t["image_id"] for t in targets]
    assert len(ids) == 12 and sorted(ids) == train.ids  # shuffled, drop_last=False

    # The shuffle is reproducible by seed (checked on a cheap stand-in dataset).
    cheap = [(torch.zeros(3, 2, 2), {"image_id": i}) for i in range(12)]

    def order(seed: int) -> list[int]:
        loader = build_loader(cheap, batch_size=5, train=True, num_workers=0, seed=seed)
        return [t["image_id"] for _ in range(2) for _, _, ts in loader for t in ts]  # two epochs

    first = order(0)
    assert first == order(0) and first != order(1) and first[:12] != first[12:]
    assert sorted(first[:12]) == list(range(12))
    val_loader = build_loader(val, batch_size=4, train=False, num_workers=0)
    assert [t["image_id"] for _, _, ts in val_loader for t in ts] == val.ids
    with pytest.raises(ValueError, match="split"):
        build_dataset(cfg, "test")


def test_coco_style_split_names(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    ensure_shapes_dataset(root, 4, 3, seed=0, split_names=("train2017", "val2017"))
    assert (root / "annotations" / "instances_train2017.json").is_file()
    assert len(list((root / "val2017").iterdir())) == 3
    cfg = SimpleNamespace(dataset="coco", root=str(root), train_split="train2017", val_split="val2017",
                          transforms="coco")
    val = build_dataset(cfg, "val")
    assert len(val) == 3 and val.num_classes == 3
    image, target = val[0]
    assert min(image.shape[1:]) == 800 and target["size"].tolist() == list(image.shape[1:])
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    # The shapes dataset with COCO-style names works through the shapes path too.
    shapes_cfg = _shapes_cfg(root, train_split="train2017", val_split="val2017")
    shapes_cfg.shapes = SimpleNamespace(num_train=4, num_val=3, seed=0, min_size=96, max_size=128,
                                        max_objects=5)
    assert len(build_dataset(shapes_cfg, "train")) == 4


def test_missing_coco_points_to_readme(tmp_path: Path) -> None:
    cfg = SimpleNamespace(dataset="coco", root=str(tmp_path / "coco"), train_split="train2017",
                          val_split="val2017", transforms="coco")
    with pytest.raises(FileNotFoundError, match="datasets/README.md") as err:
        build_dataset(cfg, "train")
    assert "instances_train2017.json" in str(err.value) and "data.root" in str(err.value)
