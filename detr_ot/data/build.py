"""Dataset and DataLoader construction from the ``data`` section of a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detr_ot.data.coco import CocoDetection
from detr_ot.data.collate import collate_batch
from detr_ot.data.shapes import ensure_shapes_dataset
from detr_ot.data.transforms import build_transforms

__all__ = ["build_dataset", "build_loader", "split_paths"]

_DATASETS = ("shapes", "coco")


def split_paths(root: str | Path, split_name: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a COCO-layout split: ``root/<split>/`` and
    ``root/annotations/instances_<split>.json``."""
    root = Path(root)
    return root / split_name, root / "annotations" / f"instances_{split_name}.json"


def build_dataset(data_cfg: Any, split: str) -> CocoDetection:
    """Build the ``split`` ("train" or "val") dataset described by ``data_cfg``.

    ``data_cfg`` attributes: ``dataset`` ("shapes" | "coco"), ``root``, ``train_split``, ``val_split`` (folder
    names), ``transforms`` (preset name), and for shapes ``shapes`` with ``num_train, num_val, seed, min_size,
    max_size, max_objects``. The shapes dataset is generated under ``root`` on first use."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    kind = data_cfg.dataset
    if kind not in _DATASETS:
        raise ValueError(f"unknown data.dataset {kind!r}; expected one of {list(_DATASETS)}")
    root = Path(data_cfg.root).expanduser()
    train_split = getattr(data_cfg, "train_split", "train")
    val_split = getattr(data_cfg, "val_split", "val")
    split_name = train_split if split == "train" else val_split

    if kind == "shapes":
        s = data_cfg.shapes
        ensure_shapes_dataset(
            root, s.num_train, s.num_val, s.seed,
            min_size=s.min_size, max_size=s.max_size, max_objects=s.max_objects,
            split_names=(train_split, val_split),
        )
    img_folder, ann_file = split_paths(root, split_name)
    if kind == "coco":
        missing = [p for p in (img_folder, ann_file) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"COCO dataset not found: {', '.join(str(p) for p in missing)} missing. Expected layout: "
                f"{root}/{train_split}/ and {root}/{val_split}/ (images), "
                f"{root}/annotations/instances_{train_split}.json and instances_{val_split}.json. "
                "Point the config at it with data.root=/path/to/coco; see datasets/README.md."
            )
    transforms = build_transforms(getattr(data_cfg, "transforms", kind), train=split == "train")
    return CocoDetection(img_folder, ann_file, transforms=transforms, train=split == "train")


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
