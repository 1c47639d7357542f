"""Custom COCO-format datasets: explicit per-split paths (nested and absolute file names, missing paths), category
ids that do not start at 1 (a "background" category of id 0, categories without annotations), images without
annotations, annotations without area/iscrowd, crowd boxes; evaluation against pycocotools on a hand-completed copy
of the annotations; and one training epoch end to end from configs/custom_coco_example.yaml."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONFIGS, read_log, tiny_overrides
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ot.build import build_criterion, head_type
from detr_ot.config import ConfigError, load_config
from detr_ot.data.build import build_dataset, check_same_categories, resolve_split
from detr_ot.data.coco import AnnotationError, CocoDetection
from detr_ot.engine.checkpoint import load_checkpoint
from detr_ot.engine.trainer import run
from detr_ot.evaluation import CocoEvaluator

CUSTOM_YAML = CONFIGS / "custom_coco_example.yaml"

# "background" (id 0) first, ids not starting at 1 and not consecutive, "unused" (id 9) never annotated.
CATEGORIES = [{"id": 7, "name": "disk"}, {"id": 0, "name": "background"}, {"id": 3, "name": "square"},
              {"id": 9, "name": "unused"}]
LABEL_TO_CAT = [0, 3, 7, 9]  # sorted by id: label k <-> LABEL_TO_CAT[k]


def _draw(path: Path, width: int, height: int, anns: list[dict], seed: int) -> None:
    """A noisy background with each annotation's box drawn in its category's colour."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 80, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    colours = {0: (200, 200, 60), 3: (220, 40, 40), 7: (40, 200, 220)}
    for ann in anns:
        x, y, w, h = ann["bbox"]
        shape = draw.ellipse if ann["category_id"] == 7 else draw.rectangle
        shape([x, y, x + w - 1, y + h - 1], fill=colours[ann["category_id"]])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_split(root: Path, split: str, images: list[dict], anns: list[dict], categories=None) -> SimpleNamespace:
    """Images under ``root/<split>_pics/`` (file names as given, nested or absolute) and the annotation file
    ``root/annotations/<split>.json``; ``images`` entries carry id, file_name, width, height."""
    folder = root / f"{split}_pics"
    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        own = [a for a in anns if a["image_id"] == img["id"]]
        _draw(folder / img["file_name"], img["width"], img["height"], own, seed=k)
    ann_file = root / "annotations" / f"{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": anns, "categories": categories or CATEGORIES}
    ann_file.write_text(json.dumps(data))
    return SimpleNamespace(images=folder, ann=ann_file, data=data)


def custom_dataset(root: Path) -> SimpleNamespace:
    """The end-to-end dataset: nested and absolute file names, image ids from 0, an image without
    annotations in each split, annotations without area / iscrowd, a crowd box, annotation ids from 0 in
    val, a category-0 object in training, a category (9) never annotated."""
    elsewhere = root / "elsewhere" / "outside.png"
    train_images = [
        {"id": 0, "file_name": "day/a.png", "width": 96, "height": 72},
        {"id": 1, "file_name": "night/deep/b.png", "width": 64, "height": 80},
        {"id": 2, "file_name": "c.png", "width": 80, "height": 80},
        {"id": 3, "file_name": str(elsewhere), "width": 72, "height": 64},
        {"id": 4, "file_name": "day/empty.png", "width": 64, "height": 64},
    ]
    train_anns = [
        {"id": 1, "image_id": 0, "category_id": 3, "bbox": [10, 8, 30, 24]},  # no area, no iscrowd
        {"id": 2, "image_id": 0, "category_id": 7, "bbox": [50, 30, 30, 30], "area": 700.0},
        {"id": 3, "image_id": 1, "category_id": 0, "bbox": [5, 5, 40, 20], "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [20, 40, 30, 30]},
        {"id": 5, "image_id": 2, "category_id": 3, "bbox": [30, 30, 40, 40], "area": 1600, "iscrowd": 1},
        {"id": 6, "image_id": 2, "category_id": 7, "bbox": [4, 4, 20, 20]},
        {"id": 7, "image_id": 3, "category_id": 3, "bbox": [12, 10, 36, 30]},
    ]
    val_images = [
        {"id": 0, "file_name": "v/0.png", "width": 80, "height": 64},
        {"id": 1, "file_name": "v/w/1.png", "width": 64, "height": 96},
        {"id": 2, "file_name": "v/empty.png", "width": 72, "height": 72},
    ]
    val_anns = [
        {"id": 0, "image_id": 0, "category_id": 3, "bbox": [8, 8, 30, 30]},  # id 0, no area / iscrowd
        {"id": 1, "image_id": 0, "category_id": 7, "bbox": [40, 20, 30, 30], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [10, 40, 40, 40], "area": 1200.0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 30], "iscrowd": 1},
    ]
    train = write_split(root, "train", train_images, train_anns)
    assert elsewhere.is_file() and not (train.images / "elsewhere").exists()  # an absolute name stays put
    val = write_split(root, "val", val_images, val_anns)
    return SimpleNamespace(train=train, val=val)


def completed(data: dict) -> dict:
    """The annotations as pycocotools needs them, completed by hand: area = w * h and iscrowd = 0 where
    absent, annotation ids from 1 (pycocotools treats a match to ground-truth id 0 as no match)."""
    data = copy.deepcopy(data)
    for k, ann in enumerate(data["annotations"], start=1):
        ann["id"] = k
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    return data


def pycocotools_stats(gt_data: dict, detections: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_data)
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(s) for s in coco_eval.stats]


def data_cfg(**kw) -> SimpleNamespace:
    base = dict(dataset="coco", root="unused", train_split="train", val_split="val", transforms="shapes",
                train_ann=None, train_images=None, val_ann=None, val_images=None)
    base.update(kw)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------------------------------
# Label mapping


def test_label_mapping_round_trip_with_category_zero(tmp_path: Path) -> None:
    ds_files = custom_dataset(tmp_path).train
    ds = CocoDetection(ds_files.images, ds_files.ann, train=True)
    assert ds.label_to_cat_id == LABEL_TO_CAT and ds.num_classes == 4
    assert ds.class_names == ["background", "square", "disk", "unused"]
    assert ds.cat_id_to_label == {0: 0, 3: 1, 7: 2, 9: 3}
    for cat_id in (0, 3, 7, 9):  # id -> label -> id
        assert ds.label_to_cat_id[ds.cat_id_to_label[cat_id]] == cat_id
    for label in range(4):  # label -> id -> label
        assert ds.cat_id_to_label[ds.label_to_cat_id[label]] == label
    labels = torch.tensor([[3, 0], [2, 1]])
    assert ds.labels_to_cat_ids(labels).tolist() == [[9, 0], [7, 3]]
    with pytest.raises(ValueError, match="0..3"):
        ds.labels_to_cat_ids(torch.tensor([4]))  # index K is the softmax head's no-object class, not a category
    # Targets: the category-0 object is label 0; the crowd box is dropped from training targets only.
    by_id = {ds.ids[i]: ds[i][1] for i in range(len(ds))}
    assert by_id[1]["labels"].tolist() == [0, 2]
    assert by_id[2]["labels"].tolist() == [2] and by_id[2]["iscrowd"].tolist() == [0]
    assert by_id[4]["labels"].shape == (0,) and by_id[4]["boxes"].shape == (0, 4)
    assert by_id[0]["area"].tolist() == [720.0, 700.0]  # filled in as w * h where absent
    val = CocoDetection(ds_files.images, ds_files.ann, train=False)
    assert {val.ids[i]: val[i][1] for i in range(len(val))}[2]["iscrowd"].tolist() == [1, 0]


def test_annotation_id_zero_is_renumbered_and_missing_fields_filled(tmp_path: Path) -> None:
    files = custom_dataset(tmp_path).val
    coco = CocoDetection(files.images, files.ann).coco
    anns = coco.dataset["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4]  # file order kept, ids from 1
    assert [a["iscrowd"] for a in anns] == [0, 0, 0, 1]
    assert [a["area"] for a in anns] == [900.0, 900.0, 1200.0, 1920.0]
    assert sorted(coco.cats) == [0, 3, 7, 9] and sorted(coco.imgs) == [0, 1, 2]
    # Without ids starting at 0, they are kept.
    train = custom_dataset(tmp_path / "t").train
    assert [a["id"] for a in CocoDetection(train.images, train.ann).coco.dataset["annotations"]] == list(range(1, 8))


@pytest.mark.parametrize("backend", ["pycocotools", "hotcoco"])
def test_evaluation_counts_like_pycocotools_on_completed_annotations(tmp_path: Path, backend: str) -> None:
    """Detections written back with the file's own category ids (0 included) and scored as pycocotools scores
    them on the hand-completed annotations: crowd boxes ignored, the empty image's detections false positives,
    the never-annotated category left out of the mean."""
    files = custom_dataset(tmp_path).val
    ds = CocoDetection(files.images, files.ann)
    cat = ds.cat_id_to_label
    preds = {  # (xyxy box, score, category id) per image
        0: [([8, 8, 38, 38], 0.9, 3), ([41, 21, 70, 50], 0.8, 7), ([0, 0, 20, 20], 0.7, 0), ([8, 8, 38, 38], 0.2, 9)],
        1: [([10, 40, 50, 80], 0.6, 7), ([2, 0, 60, 28], 0.95, 3), ([12, 42, 48, 78], 0.5, 3)],
        2: [([10, 10, 30, 30], 0.85, 7), ([5, 5, 25, 25], 0.3, 0)],
    }
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id, backend=backend)
    evaluator.update({
        image_id: {
            "boxes": torch.tensor([p[0] for p in rows], dtype=torch.float64),
            "scores": torch.tensor([p[1] for p in rows], dtype=torch.float64),
            "labels": torch.tensor([cat[p[2]] for p in rows]),
        }
        for image_id, rows in preds.items()
    })
    stats = evaluator.evaluate()
    evaluator.dump(tmp_path / "det.json")
    detections = json.loads((tmp_path / "det.json").read_text())
    assert sorted((d["image_id"], d["category_id"]) for d in detections) == sorted(
        (i, p[2]) for i, rows in preds.items() for p in rows)
    expected = pycocotools_stats(completed(files.data), detections)
    assert stats == pytest.approx(expected, rel=0, abs=1e-12)
    assert 0 < expected[0] < 1  # neither vacuous nor trivially perfect


@pytest.mark.parametrize("matcher, cls", [("hungarian", "ce"), ("hungarian", "focal"), ("sinkhorn", "ce"),
                                          ("sinkhorn", "focal")])
def test_label_zero_is_not_padding_or_no_object(matcher: str, cls: str) -> None:
    """Renaming the classes (a permutation of the K labels and of the logit columns, the softmax no-object
    column, last, kept) must leave every loss term unchanged. If padded target slots (label 0 in
    PaddedTargets) or the no-object class were read as label 0 anywhere, the loss would depend on which
    class is label 0. Image 0 has one object (two padded slots), of label 0. Float64 logits; each query
    sits near its own ground truth, so the Hungarian matching has a clear margin."""
    cfg = load_config(CUSTOM_YAML, ["model.pretrained=false", f"matcher.name={matcher}", f"loss.cls={cls}"])
    k = 4
    criterion = build_criterion(cfg, k)
    extra = 1 if head_type(cfg) == "softmax" else 0
    gen = torch.Generator().manual_seed(0)
    gt = [torch.tensor([[0.3, 0.3, 0.2, 0.2]]),
          torch.tensor([[0.2, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.8, 0.4, 0.2]])]
    labels = [torch.tensor([0]), torch.tensor([0, 2, 3])]
    boxes = torch.rand(2, 6, 4, generator=gen) * 0.3 + 0.2
    boxes[0, 0] = gt[0][0] + 0.01
    boxes[1, :3] = gt[1] + 0.01
    logits = torch.randn(2, 6, k + extra, generator=gen, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])  # old label j becomes perm[j]
    permuted = logits.clone()
    permuted[..., perm] = logits[..., :k]

    def targets(relabel) -> list[dict]:  # noqa: ANN001
        pairs = enumerate(zip(gt, labels, strict=True))
        return [{"boxes": b, "labels": relabel(lab), "image_id": i} for i, (b, lab) in pairs]

    plain = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets(lambda lab: lab))
    renamed = criterion({"pred_logits": permuted, "pred_boxes": boxes}, targets(lambda lab: perm[lab]))
    for key in ("loss_cls", "loss_bbox", "loss_giou", "loss"):
        assert float(renamed[key]) == pytest.approx(float(plain[key]), rel=1e-6, abs=1e-9), key
    assert float(plain["loss_cls"]) > 0


def test_train_and_val_must_list_the_same_categories(tmp_path: Path) -> None:
    files = custom_dataset(tmp_path)
    data = json.loads(files.val.ann.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] != 9] + [{"id": 11, "name": "new"}]
    files.val.ann.write_text(json.dumps(data))
    train = CocoDetection(files.train.images, files.train.ann)
    val = CocoDetection(files.val.images, files.val.ann)
    with pytest.raises(AnnotationError) as err:
        check_same_categories(train, val)
    msg = str(err.value)
    assert "only in training: [9]" in msg and "only in evaluation: [11]" in msg
    assert str(files.train.ann) in msg and str(files.val.ann) in msg
    check_same_categories(train, CocoDetection(files.train.images, files.train.ann))  # no error


@pytest.mark.parametrize(
    "orientation, json_size, rot90",
    [(6, (60, 40), -1),  # EXIF 6: shown turned 90 degrees clockwise; the file gives the upright size
     (8, (60, 40), 1),  # EXIF 8: 90 degrees counter-clockwise
     (3, (40, 60), 2),  # EXIF 3: 180 degrees, same size: shown upright, as viewers and annotation tools do
     (6, (40, 60), 0),  # the file gives the stored size: the annotations are on the stored pixels
     (1, (40, 60), 0)],
)
def test_exif_orientation_follows_the_annotated_size(tmp_path: Path, orientation, json_size, rot90) -> None:
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (60, 40, 3), dtype=np.uint8)  # 40 wide, 60 tall on disk
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "img").mkdir()
    Image.fromarray(stored).save(tmp_path / "img" / "p.png", exif=exif)
    w, h = json_size
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "p.png", "width": w, "height": h}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 2, 10, 5]}],
                               "categories": [{"id": 0, "name": "background"}]}))
    image, target = CocoDetection(tmp_path / "img", ann)[0]
    np.testing.assert_array_equal(np.asarray(image), np.rot90(stored, k=rot90))
    assert target["orig_size"].tolist() == [h, w] and target["boxes"].tolist() == [[1, 2, 11, 7]]


def test_image_size_matching_neither_orientation_is_an_error(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 60)).save(tmp_path / "img" / "p.png", exif=exif)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 5, "file_name": "p.png", "width": 50, "height": 50}],
                               "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(AnnotationError) as err:
        CocoDetection(tmp_path / "img", ann)[0]
    msg = str(err.value)
    assert "40x60 on disk" in msg and "EXIF orientation 6: 60x40" in msg and "50x50" in msg and "image id 5" in msg


# ----------------------------------------------------------------------------------------------------
# Explicit per-split paths


def test_explicit_paths_absolute_relative_and_nested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = custom_dataset(tmp_path)
    cfg = data_cfg(train_ann=str(files.train.ann), train_images=str(files.train.images),
                   val_ann=str(files.val.ann), val_images=str(files.val.images))
    train = build_dataset(cfg, "train")
    assert train.train and len(train) == 5 and train.ann_file == files.train.ann
    for i in range(len(train)):  # nested, top-level and absolute file names all load
        image, target = train[i]
        info = train.coco.imgs[train.ids[i]]
        assert tuple(image.shape[1:]) == (info["height"], info["width"])
    val = build_dataset(cfg, "val")
    assert not val.train and len(val) == 3 and val.img_folder == files.val.images

    # Relative to the working directory; each key replaces only its own layout default.
    monkeypatch.chdir(tmp_path)
    cfg = data_cfg(root="layout", val_ann="annotations/val.json")
    split = resolve_split(cfg, "val")
    assert split.ann == Path("annotations/val.json") and split.ann_key == "data.val_ann"
    assert split.images == Path("layout/val") and split.images_key is None
    split = resolve_split(data_cfg(root="~/somewhere", train_images="~/pics"), "train")
    home = Path.home()
    assert split.images == home / "pics" and split.ann == home / "somewhere/annotations/instances_train.json"


@pytest.mark.parametrize(
    "key, make_bad, what",
    [("val_ann", lambda p: p / "nope.json", "annotation file does not exist"),
     ("val_ann", lambda p: p / "annotations", "annotation file is a folder"),
     ("train_ann", lambda p: p / "missing" / "train.json", "annotation file does not exist"),
     ("train_images", lambda p: p / "no_pics", "image folder does not exist"),
     ("val_images", lambda p: p / "annotations" / "val.json", "image folder is a file")],
)
def test_missing_explicit_path_names_key_and_path_at_start_up(tmp_path: Path, key, make_bad, what) -> None:
    files = custom_dataset(tmp_path)
    paths = dict(train_ann=str(files.train.ann), train_images=str(files.train.images),
                 val_ann=str(files.val.ann), val_images=str(files.val.images))
    bad = make_bad(tmp_path)
    paths[key] = str(bad)
    # Building the training split checks the evaluation split's paths as well: a typo in data.val_ann
    # fails before the training annotations are loaded, not after the first epoch.
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(data_cfg(**paths), "train")
    assert f"data.{key}={bad}" in str(err.value) and what in str(err.value)


def test_missing_image_file_names_the_image_key(tmp_path: Path) -> None:
    files = custom_dataset(tmp_path)
    (files.val.images / "v" / "w" / "1.png").unlink()
    cfg = data_cfg(val_ann=str(files.val.ann), val_images=str(files.val.images))
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(cfg, "val")
    msg = str(err.value)
    assert "v/w/1.png" in msg and str(files.val.ann) in msg and f"data.val_images={files.val.images}" in msg


def test_explicit_paths_are_refused_for_the_shapes_dataset() -> None:
    with pytest.raises(ConfigError, match="data.train_ann"):
        load_config(CONFIGS / "shapes.yaml", ["data.train_ann=/some/train.json"])
    load_config(CONFIGS / "shapes.yaml", ["data.dataset=coco", "data.train_ann=/some/train.json"])


# ----------------------------------------------------------------------------------------------------
# End to end: one epoch from explicit paths through tools/train.py


@pytest.mark.usefixtures("one_torch_thread")
def test_train_one_epoch_from_explicit_paths(tmp_path: Path, train_cli, capsys, monkeypatch) -> None:
    set_threads: list[int] = []  # train.threads reaches torch (the fixture restores the count afterwards)
    real_set_num_threads = torch.set_num_threads

    def record(n: int) -> None:
        set_threads.append(n)
        real_set_num_threads(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    files = custom_dataset(tmp_path / "data")
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tmp_path / "no_root", out,
        f"data.train_ann={files.train.ann}", f"data.train_images={files.train.images}",
        f"data.val_ann={files.val.ann}", f"data.val_images={files.val.images}",
        "data.scales=[64,80,96]", "data.max_size=128", "data.val_scale=80", "data.batch_size=2",
        "data.eval_batch_size=2", "model.pretrained=false", "loss.cls=focal", "train.max_iters_per_epoch=2",
        "train.threads=1", epochs=1,
    )
    args = ["--config", str(CUSTOM_YAML), "--no-progress", *overrides]
    assert train_cli.main(args) == 0, capsys.readouterr().err
    assert set_threads == [1]

    (record,) = read_log(out)
    assert record["epoch"] == 0 and np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])
    assert len(record["test_coco_eval_bbox"]) == 12
    cfg = load_config(out / "config.yaml")
    assert (cfg.data.train_ann, cfg.data.val_images) == (str(files.train.ann), str(files.val.images))
    assert (cfg.data.transforms, cfg.data.scales, cfg.data.max_size) == ("coco", [64, 80, 96], 128)
    state = load_checkpoint(out / "checkpoint.pth")
    assert state["epoch"] == 0
    assert state["model"]["class_embed.weight"].shape[0] == 4  # sigmoid head: one logit per listed category

    # Evaluate the checkpoint: detections carry the file's category ids (the sigmoid head keeps every
    # (query, category) pair, so all four appear, 0 included), and the numbers are pycocotools' on the
    # hand-completed annotations, and those of the training epoch's evaluation.
    result = run(load_config(CUSTOM_YAML, overrides), eval_only=True, progress=False)
    detections = json.loads((out / "detections.json").read_text())
    assert {d["category_id"] for d in detections} == {0, 3, 7, 9}
    assert {d["image_id"] for d in detections} == {0, 1, 2}
    expected = pycocotools_stats(completed(files.val.data), detections)
    assert result["test_coco_eval_bbox"] == pytest.approx(expected, rel=0, abs=1e-12)
    assert record["test_coco_eval_bbox"] == pytest.approx(expected, rel=0, abs=1e-12)


def test_train_and_val_categories_differing_exit_with_a_clear_message(tmp_path: Path, train_cli, capsys) -> None:
    files = custom_dataset(tmp_path / "data")
    data = json.loads(files.val.ann.read_text())
    data["categories"] = data["categories"][:3]
    files.val.ann.write_text(json.dumps(data))
    overrides = tiny_overrides(
        tmp_path / "no_root", tmp_path / "run",
        f"data.train_ann={files.train.ann}", f"data.train_images={files.train.images}",
        f"data.val_ann={files.val.ann}", f"data.val_images={files.val.images}", "model.pretrained=false",
    )
    assert train_cli.main(["--config", str(CUSTOM_YAML), "--no-progress", *overrides]) == 1
    err = capsys.readouterr().err
    assert "only in training: [9]" in err, err
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_missing_explicit_path_exits_before_training(tmp_path: Path, train_cli, capsys) -> None:
    files = custom_dataset(tmp_path / "data")
    typo = files.val.ann.with_name("vall.json")
    overrides = tiny_overrides(
        tmp_path / "no_root", tmp_path / "run",
        f"data.train_ann={files.train.ann}", f"data.train_images={files.train.images}",
        f"data.val_ann={typo}", f"data.val_images={files.val.images}", "model.pretrained=false",
    )
    assert train_cli.main(["--config", str(CUSTOM_YAML), "--no-progress", *overrides]) == 1
    err = capsys.readouterr().err
    assert f"data.val_ann={typo}: annotation file does not exist" in err, err
    assert not (tmp_path / "run" / "log.txt").exists()
