"""Dataset and DataLoader construction from the ``data`` section of a config.

A split's files come either from the COCO folder layout under ``data.root`` (``root/<split>/`` and
``root/annotations/instances_<split>.json``) or from the explicit keys ``data.{train,val}_ann`` and
``data.{train,val}_images``, each of which replaces its layout default. Missing paths are reported at
start-up, naming the config key and the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detr_ot.data.coco import AnnotationError, CocoDetection
from detr_ot.data.collate import collate_batch
from detr_ot.data.shapes import ensure_shapes_dataset, shapes_options
from detr_ot.data.transforms import Resolution, build_transforms

__all__ = [
    "SplitFiles",
    "build_dataset",
    "build_loader",
    "check_same_categories",
    "resolution_from_cfg",
    "resolve_split",
    "split_paths",
]

_DATASETS = ("shapes", "coco")


def split_paths(root: str | Path, split_name: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a COCO-layout split: ``root/<split>/`` and
    ``root/annotations/instances_<split>.json``."""
    root = Path(root)
    return root / split_name, root / "annotations" / f"instances_{split_name}.json"


@dataclass(frozen=True)
class SplitFiles:
    """Where one split's data lives, and which config key each path came from (``None``: the layout)."""

    images: Path
    ann: Path
    images_key: str | None
    ann_key: str | None


def resolve_split(data_cfg: Any, split: str) -> SplitFiles:
    """Image folder and annotation file of ``split`` ("train" or "val"): ``data.<split>_images`` /
    ``data.<split>_ann`` where set (``~`` expanded, relative to the working directory), otherwise the COCO
    layout under ``data.root``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    split_name = getattr(data_cfg, f"{split}_split", split)
    layout_images, layout_ann = split_paths(Path(data_cfg.root).expanduser(), split_name)
    images_key, ann_key = f"{split}_images", f"{split}_ann"
    images = getattr(data_cfg, images_key, None)
    ann = getattr(data_cfg, ann_key, None)
    return SplitFiles(
        images=Path(images).expanduser() if images else layout_images,
        ann=Path(ann).expanduser() if ann else layout_ann,
        images_key=f"data.{images_key}" if images else None,
        ann_key=f"data.{ann_key}" if ann else None,
    )


def _check_split_files(data_cfg: Any, files: SplitFiles) -> None:
    """FileNotFoundError naming the config key and path of a missing annotation file or image folder."""
    problems = []
    if files.ann_key is not None and not files.ann.is_file():
        what = "is a folder, not a file" if files.ann.is_dir() else "does not exist"
        problems.append(f"{files.ann_key}={files.ann}: annotation file {what}")
    if files.images_key is not None and not files.images.is_dir():
        what = "is a file, not a folder" if files.images.exists() else "does not exist"
        problems.append(f"{files.images_key}={files.images}: image folder {what}")
    layout = [p for p, key in ((files.images, files.images_key), (files.ann, files.ann_key))
              if key is None and not p.exists()]
    if layout:
        root = Path(data_cfg.root).expanduser()
        train_split = getattr(data_cfg, "train_split", "train")
        val_split = getattr(data_cfg, "val_split", "val")
        problems.append(
            f"COCO dataset not found: {', '.join(str(p) for p in layout)} missing. Expected layout: "
            f"{root}/{train_split}/ and {root}/{val_split}/ (images), "
            f"{root}/annotations/instances_{train_split}.json and instances_{val_split}.json. "
            "Point the config at it with data.root=/path/to/coco, or give the files of each split with "
            "data.train_ann, data.train_images, data.val_ann, data.val_images; see datasets/README.md."
        )
    if problems:
        raise FileNotFoundError("; ".join(problems))


def resolution_from_cfg(data_cfg: Any) -> Resolution:
    """The transforms' :class:`Resolution` from ``data.scales``, ``max_size``, ``val_scale``,
    ``crop_scales`` and ``crop_size`` (DETR's values for any key the config does not have)."""
    default = Resolution()
    return Resolution(
        scales=tuple(getattr(data_cfg, "scales", default.scales)),
        max_size=getattr(data_cfg, "max_size", default.max_size),
        val_scale=getattr(data_cfg, "val_scale", default.val_scale),
        crop_scales=getattr(data_cfg, "crop_scales", None),
        crop_size=getattr(data_cfg, "crop_size", None),
    )


def build_dataset(data_cfg: Any, split: str) -> CocoDetection:
    """Build the ``split`` ("train" or "val") dataset described by ``data_cfg``.

    ``data_cfg`` attributes: ``dataset`` ("shapes" | "coco"), ``root``, ``train_split``, ``val_split`` (folder
    names), ``transforms`` (preset name), optionally ``train_ann``, ``train_images``, ``val_ann``,
    ``val_images`` (explicit paths, coco only) and the resolution keys of :func:`resolution_from_cfg`, and for
    shapes ``shapes`` with ``num_train, num_val, seed, min_size, max_size, max_objects``. The shapes dataset
    is generated under ``root`` on first use. Building the training split checks the evaluation split's
    paths too, so that a typo in either fails before any annotation file is loaded."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    kind = data_cfg.dataset
    if kind not in _DATASETS:
        raise ValueError(f"unknown data.dataset {kind!r}; expected one of {list(_DATASETS)}")
    files = resolve_split(data_cfg, split)
    if kind == "shapes":
        explicit = [k for k in (files.ann_key, files.images_key) if k is not None]
        if explicit:
            raise ValueError(f"{explicit[0]} is set but data.dataset=shapes generates its own files; "
                             "use data.dataset=coco for a COCO-format dataset of your own")
        s = data_cfg.shapes
        ensure_shapes_dataset(
            Path(data_cfg.root).expanduser(), s.num_train, s.num_val, s.seed,
            **shapes_options(s),
            split_names=(getattr(data_cfg, "train_split", "train"), getattr(data_cfg, "val_split", "val")),
        )
    else:
        for other in ("train", "val") if split == "train" else ("val",):
            _check_split_files(data_cfg, resolve_split(data_cfg, other))
    transforms = build_transforms(
        getattr(data_cfg, "transforms", kind), train=split == "train", resolution=resolution_from_cfg(data_cfg)
    )
    try:
        return CocoDetection(files.images, files.ann, transforms=transforms, train=split == "train")
    except FileNotFoundError as err:
        if files.images_key is None:
            raise
        raise FileNotFoundError(f"{err}; file_name is relative to {files.images_key}={files.images}") from err


def check_same_categories(train_set: CocoDetection, val_set: CocoDetection) -> None:
    """AnnotationError unless both splits list the same category ids: the model's K classes and the
    label <-> category id mapping are shared by training and evaluation."""
    train_ids, val_ids = train_set.label_to_cat_id, val_set.label_to_cat_id
    if train_ids != val_ids:
        only_train = sorted(set(train_ids) - set(val_ids))
        only_val = sorted(set(val_ids) - set(train_ids))
        raise AnnotationError(
            f"the training annotations {train_set.ann_file} and the evaluation annotations {val_set.ann_file} "
            f"list different categories (ids only in training: {only_train}, only in evaluation: {only_val}); "
            "both splits must carry the same 'categories' list, with or without annotations of each"
        )


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int,
    sampler: Sampler | None = None,
    seed: int = 0,
) -> DataLoader:
    """DataLoader with :func:`collate_batch`. Training shuffles with a generator seeded by ``seed`` unless a
    ``sampler`` (e.g. DistributedSampler) is given; the generator also seeds the workers' RNGs, so
    augmentation is reproducible. Training workers are not persistent: call :func:`seed_loader_epoch` before
    each epoch so an epoch's augmentation depends only on (seed, epoch), and a resumed run replays it exactly.
    Never drops the last partial batch."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_batch,
        drop_last=False,
        persistent_workers=num_workers > 0 and not train,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )


def seed_loader_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Re-seed the loader's generator (which seeds the workers of the next iterator) for ``epoch``."""
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
