"""The shapes generator's object count and size options: the defaults reproduce the original generator's output
exactly, and the dense small-object variant (configs/shapes_small.yaml) keeps every placement rule on the
annotated boxes themselves."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_ot.config import ShapesConfig, load_config
from detr_ot.data import shapes as shapes_mod
from detr_ot.data.shapes import GENERATOR_DEFAULTS, ensure_shapes_dataset, generate_shapes, shapes_options

ROOT = Path(__file__).resolve().parents[1]

# Computed with the generator as it was before the count and size options existed (commit 0df1ebc):
# ensure_shapes_dataset(root, num_train=3, num_val=2, seed=0). Pixels are hashed after decoding (the PNG bytes
# depend on the zlib build), the annotation JSON as written.
_OLD_JSON_SHA256 = {
    "train": "2d788806af7f2ea3f6df7cf23fa34b0000af9ccbe6091f6a6883291edc671749",
    "val": "b75011b8aeb12a886f54bed60ebd5139514c96edb2d3c541f178e436b5fe507e",
}
_OLD_PIXELS_SHA256 = {
    "train": [
        ((102, 119), "ea2b465d8982b7eb99933f86bfb5728a1e83561919d83418e742578920bf93a1"),
        ((122, 108), "e78a841e41f8825922acdf551dee1bedaba9b50df1d85f823d41a562ae4de8f6"),
        ((118, 100), "41809bb426aecfe5bd525a4eb6029f5202fb8ba00597f80ee409ab2ca4b4c3ff"),
    ],
    "val": [
        ((111, 102), "80690bb5230ac95a86d6ffbba2c53920b5db850ff52caa8524a7ec5d364ae065"),
        ((102, 96), "d610cf3c5eeea3936a5917e3b36d9441c8ee66332f5e5739288d2586b8ef9a3b"),
    ],
}
_OLD_VAL_ANNOTATIONS = [  # (image_id, category_id, bbox, area): readable part of the fixture
    (1, 3, [33.0, 22.0, 33.0, 22.0], 358.0),
    (1, 2, [3.0, 63.0, 55.0, 39.0], 1681.0),
    (1, 1, [66.0, 35.0, 33.0, 26.0], 858.0),
    (2, 2, [78.0, 65.0, 17.0, 21.0], 281.0),
    (2, 1, [6.0, 54.0, 22.0, 37.0], 814.0),
]
_OLD_PARAMS = {
    "generator_version": 1, "num_train": 3, "num_val": 2, "seed": 0, "min_size": 96, "max_size": 128,
    "max_objects": 5, "split_names": ["train", "val"],
}

# The small-object variant's CLI, as in the comment of configs/shapes_small.yaml.
_SMALL_FLAGS = [
    "--min-size", "128", "--max-size", "128", "--min-objects", "4", "--max-objects", "20", "--min-rel-size",
    "0.0625", "--max-rel-size", "0.1875", "--max-rel-side", "0.1875", "--placement-tries", "100", "--strict-boxes",
]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _small_options() -> dict:
    return shapes_options(load_config(ROOT / "configs" / "shapes_small.yaml").data.shapes)


def _iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (x, y, w, h) boxes, in float64, written independently of the generator's helper."""
    out = np.zeros((len(boxes), len(boxes)))
    for i, j in itertools.combinations(range(len(boxes)), 2):
        (xa, ya, wa, ha), (xb, yb, wb, hb) = boxes[i], boxes[j]
        iw = max(0.0, min(xa + wa, xb + wb) - max(xa, xb))
        ih = max(0.0, min(ya + ha, yb + hb) - max(ya, yb))
        out[i, j] = out[j, i] = iw * ih / (wa * ha + wb * hb - iw * ih)
    return out


# ----------------------------------------------------------------------------------------------------
# Defaults: the original dataset, byte for byte


def test_default_config_reproduces_the_original_generator(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    cfg = ShapesConfig(num_train=3, num_val=2)
    ensure_shapes_dataset(root, cfg.num_train, cfg.num_val, cfg.seed, **shapes_options(cfg))
    # Options at their defaults are not part of the key, so a cache made by the old generator stays valid.
    assert json.loads((root / "params.json").read_text()) == _OLD_PARAMS
    for split in ("train", "val"):
        text = (root / "annotations" / f"instances_{split}.json").read_bytes()
        assert hashlib.sha256(text).hexdigest() == _OLD_JSON_SHA256[split], split
        for index, (shape, digest) in enumerate(_OLD_PIXELS_SHA256[split]):
            px = _pixels(root / split / f"{index + 1:06d}.png")
            assert px.shape == (*shape, 3)
            assert hashlib.sha256(px.tobytes()).hexdigest() == digest, (split, index + 1)
    anns = json.loads((root / "annotations" / "instances_val.json").read_text())["annotations"]
    assert [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in anns] == _OLD_VAL_ANNOTATIONS


def test_config_defaults_are_the_generator_defaults() -> None:
    options = shapes_options(ShapesConfig())
    assert {k: options[k] for k in GENERATOR_DEFAULTS} == GENERATOR_DEFAULTS
    assert (options["min_size"], options["max_size"], options["max_objects"]) == (96, 128, 5)


def test_a_changed_option_regenerates_and_is_recorded(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "s"
    ensure_shapes_dataset(root, 2, 1, seed=0)
    before = _pixels(root / "train" / "000001.png")
    ensure_shapes_dataset(root, 2, 1, seed=0, max_rel_size=0.3)
    params = json.loads((root / "params.json").read_text())
    assert params["max_rel_size"] == 0.3 and "min_rel_size" not in params  # only the non-default option
    assert not np.array_equal(before, _pixels(root / "train" / "000001.png"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated although the parameters are unchanged")

    monkeypatch.setattr(shapes_mod, "generate_shapes", must_not_run)
    ensure_shapes_dataset(root, 2, 1, seed=0, max_rel_size=0.3, min_rel_size=0.12)  # default: same key
    with pytest.raises(TypeError, match="max_objcts"):
        ensure_shapes_dataset(root, 2, 1, seed=0, max_objcts=3)
    with pytest.raises(TypeError, match="strict_boxes"):
        ensure_shapes_dataset(root, 2, 1, seed=0, strict_boxes="yes")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_rel_size": 0.0}, "min_rel_size"),
        ({"min_rel_size": 0.3, "max_rel_size": 0.2}, "max_rel_size"),
        ({"min_rel_size": 0.3, "max_rel_side": 0.2}, "max_rel_side"),
        ({"max_rel_side": 1.5}, "max_rel_side"),
        ({"placement_tries": 0}, "placement_tries"),
        ({"max_distractors": -1}, "max_distractors"),
        ({"min_objects": 6, "max_objects": 5}, "min_objects"),
    ],
)
def test_bad_options_are_named(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_shapes(tmp_path, "t", 1, seed=0, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Dense small objects


def test_small_config_and_cli_describe_the_same_dataset(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "shapes_small.yaml")
    assert cfg.data.root == "datasets/shapes_small"
    assert cfg.model.num_queries >= cfg.data.shapes.max_objects
    shapes_mod.main(["--root", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1", *_SMALL_FLAGS])
    ensure_shapes_dataset(tmp_path / "cfg", 2, 1, seed=0, **_small_options())
    assert (tmp_path / "cli" / "params.json").read_text() == (tmp_path / "cfg" / "params.json").read_text()
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / "cli" / name).read_text() == (tmp_path / "cfg" / name).read_text()


def test_small_variant_counts_sizes_and_overlaps(tmp_path: Path) -> None:
    """Both sides of every annotated box lie in [8, 24] px: the shapes are axis-aligned and strict_boxes
    enforces the range on the tight pixel box (not only on the sampled real-valued size)."""
    opts = _small_options()
    ann_file = generate_shapes(tmp_path, "t", 24, seed=7, **opts)
    data = json.loads(ann_file.read_text())
    counts = []
    for img in data["images"]:
        assert (img["width"], img["height"]) == (128, 128)
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        counts.append(len(anns))
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        x, y, w, h = boxes.T
        assert (x >= 0).all() and (y >= 0).all() and (x + w <= 128).all() and (y + h <= 128).all()
        assert ((w >= 8) & (w <= 24) & (h >= 8) & (h <= 24)).all(), boxes
        assert all(0 < a["area"] <= a["bbox"][2] * a["bbox"][3] for a in anns)
        assert _iou_matrix(boxes).max() <= 0.3
    assert all(4 <= c <= 20 for c in counts)
    assert max(counts) >= 15  # dense images do occur (not all objects dropped for lack of room)
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}


def test_small_variant_boxes_are_tight_and_objects_stay_visible(tmp_path: Path, monkeypatch) -> None:
    """Without texture and distractors, and with object k drawn in a colour of its own, object k's visible
    pixels are exactly the pixels of that colour: they lie in its box and keep >= 70 % of its area, and an
    object that no later box overlaps is fully visible, so its box is the tight box of those pixels."""
    monkeypatch.setattr(shapes_mod, "_NOISE_STD", 0.0)
    monkeypatch.setattr(shapes_mod, "_GRADIENT_AMPLITUDE", 0.0)

    def colour_of_index(rng, background, others):  # object k (0-based) gets red channel k + 1
        k = len(others) + 1
        blue = 0.0 if not np.array_equal(background, [k, 255 - k, 0]) else 255.0
        return np.array([k, 255 - k, blue])

    monkeypatch.setattr(shapes_mod, "_contrasting_colour", colour_of_index)
    opts = {**_small_options(), "max_distractors": 0}
    ann_file = generate_shapes(tmp_path, "t", 12, seed=3, **opts)
    data = json.loads(ann_file.read_text())
    exact = occluded = 0
    for img in data["images"]:
        px = _pixels(tmp_path / "t" / img["file_name"]).astype(np.int64)
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]  # in drawing order
        is_obj = (px[..., 1] == 255 - px[..., 0]) & np.isin(px[..., 0], np.arange(1, len(anns) + 1))
        background = np.unique(px[~is_obj].reshape(-1, 3), axis=0)
        assert len(background) == 1  # nothing drawn but the annotated objects
        boxes = np.array([a["bbox"] for a in anns])
        for k, ann in enumerate(anns):
            ys, xs = np.nonzero(is_obj & (px[..., 0] == k + 1))
            x, y, w, h = ann["bbox"]
            assert xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h
            assert len(xs) >= 0.7 * ann["area"]
            later = boxes[k + 1 :]
            overlapped = (
                (later[:, 0] < x + w) & (later[:, 0] + later[:, 2] > x)
                & (later[:, 1] < y + h) & (later[:, 1] + later[:, 3] > y)
            ).any()
            if overlapped:
                occluded += 1
            else:
                assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
                assert len(xs) == ann["area"]
                exact += 1
    assert exact >= 50 and occluded >= 5  # both branches exercised


def test_required_objects_that_do_not_fit_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="min_objects=12"):
        generate_shapes(tmp_path, "t", 1, seed=0, min_size=32, max_size=32, min_objects=12, max_objects=12,
                        min_rel_size=0.5, max_rel_size=0.5, max_rel_side=0.5)
