"""Typed configuration: YAML files with inheritance, ``key=value`` overrides, strict validation.

A YAML file may name a parent with ``_base_: other.yaml`` (relative to itself); the child's keys are merged
over the parent's. Unknown keys are an error listing the valid keys. Matchers and classification losses
carry their own option dataclasses, registered with them: ``matcher.<name>.<key>`` and ``loss.<name>.<key>``
are validated against the registered options of ``<name>``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ShapesConfig:
    """The built-in synthetic dataset (detr_ot/data/shapes.py)."""

    num_train: int = 2000
    num_val: int = 200
    seed: int = 0
    min_size: int = 96  # image sides are drawn from [min_size, max_size] px
    max_size: int = 128
    max_objects: int = 5
    # Object count and size; the defaults reproduce the original dataset (configs/shapes_small.yaml: dense small
    # objects). A changed value regenerates the cached dataset under data.root.
    min_objects: int = 1  # annotated objects per image: [min_objects, max_objects]
    max_distractors: int = 2  # unannotated lines, crosses and dots per image: [0, max_distractors]
    min_rel_size: float = 0.12  # smallest object scale and side, as a fraction of the image side
    max_rel_size: float = 0.5  # largest object scale (before the 1/2..2 aspect ratio), fraction of the shorter side
    max_rel_side: float = 0.6  # largest object side, as a fraction of the image width (height)
    placement_tries: int = 30  # rejected placements before an object beyond min_objects is left out
    strict_boxes: bool = False  # size range and IoU cap also on the annotated tight pixel boxes (small objects)


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes | coco
    root: str = "datasets/shapes"  # images in root/<split>/, annotations in root/annotations/instances_<split>.json
    train_split: str = "train"
    val_split: str = "val"
    transforms: str = "shapes"  # shapes | coco
    batch_size: int = 8  # per process
    eval_batch_size: int = 8  # per process
    num_workers: int = 2
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    # Any COCO-format dataset (dataset: coco): each path, when set, replaces its root/split layout default.
    # file_name in the JSON is relative to the image folder (nested sub/dir/x.jpg is fine) or absolute.
    train_ann: str | None = None  # training annotation JSON (default root/annotations/instances_<train_split>.json)
    train_images: str | None = None  # training image folder (default root/<train_split>)
    val_ann: str | None = None  # evaluation annotation JSON (default root/annotations/instances_<val_split>.json)
    val_images: str | None = None  # evaluation image folder (default root/<val_split>)
    # Input resolution of the coco transforms (DETR's recipe and numbers by default; shapes does not resize)
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))  # training shorter sides
    max_size: int | None = 1333  # cap on the longer side, training and evaluation (null: none)
    val_scale: int = 800  # evaluation shorter side
    crop_scales: list[int] | None = None  # crop branch's first resize; null: [400,500,600] * max(scales)/800
    crop_size: list[int] | None = None  # crop branch's [min, max] window side; null: [384,600] * max(scales)/800

    def __post_init__(self) -> None:
        explicit = [k for k in ("train_ann", "train_images", "val_ann", "val_images") if getattr(self, k)]
        if explicit and self.dataset == "shapes":
            raise ValueError(
                f"data.{explicit[0]} is set but data.dataset=shapes generates its own files under data.root; "
                "use data.dataset=coco for a COCO-format dataset of your own"
            )
        from detr_ot.data.transforms import Resolution  # validates the resolution keys, naming them

        Resolution(self.scales, self.max_size, self.val_scale, self.crop_scales, self.crop_size)


@dataclass
class ModelConfig:
    backbone: str = "tiny"  # tiny | any timm ResNet name, e.g. resnet50
    tiny_widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # tiny: one stride-2 stage each
    pretrained: bool = False  # timm download of the backbone weights (needs the network)
    backbone_weights: str | None = None  # local weights file for the backbone (offline use)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    query_type: str = "learned"  # learned (DETR) | anchor (anchor boxes refined per layer, DAB-DETR)
    anchor_sigma: float = 0.0  # anchor queries: Gaussian attention prior, std = sigma * anchor w/h (0: none)
    aux_loss: bool = True
    head: str = "auto"  # auto | softmax | sigmoid  (auto: what the classification loss needs)
    num_select: int = 100  # detections kept per image at evaluation (sigmoid head: top (query, class) pairs)
    nms_iou: float = 0.0  # > 0: class-wise NMS at this IoU at evaluation (one-to-many training; 0: none)
    arch: str = "detr"  # detr | deformable (multi-scale Deformable DETR family, detr_ot/models/deformable.py)
    # arch=deformable only:
    num_feature_levels: int = 4  # backbone levels (at most its last 3) + extra stride-2 levels
    enc_points: int = 4  # sampling points per head and level in the encoder's deformable attention
    dec_points: int = 4  # ... and in the decoder's cross-attention
    two_stage: bool = True  # reference boxes from the top encoder proposals (enc_outputs supervised too)
    box_refine: bool = True  # one box head per decoder layer, each refining the previous layer's box
    mixed_query_selection: bool = False  # two-stage: learned static content queries (DINO)
    look_forward_twice: bool = False  # layer i's box loss also reaches layer i-1's box head (DINO)


@dataclass
class MatcherConfig:
    name: str = "hungarian"
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    class_cost: str = "auto"  # auto | prob | focal | sigmoid_prob | logit
    options: dict[str, Any] = field(default_factory=dict)  # matcher.<name>.<key>, typed by the registry


@dataclass
class LossConfig:
    cls: str = "ce"  # ce | focal (| ranking losses)
    cls_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # weight of the no-object class in cross-entropy
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # num_boxes of the focal and box losses: objects (DETR: ground truths, summed over processes) | positives
    # (the plan's ground-truth mass, i.e. sum_j k_j for a one-to-many plan; equal to objects one-to-one)
    normalizer: str = "objects"
    options: dict[str, Any] = field(default_factory=dict)  # loss.<name>.<key>, typed by the registry


@dataclass
class HybridConfig:
    """Hybrid matching (Jia et al., "DETRs with Hybrid Matching", CVPR 2023, sec. 3.2): ``num_queries`` extra
    queries trained one-to-many beside the one-to-one queries, masked from them in self-attention and unused at
    inference (detr_ot/models/query_groups.py, detr_ot/losses/hybrid.py)."""

    num_queries: int = 0  # one-to-many queries (0: off); H-DETR uses 1500 beside 300
    k: int = 6  # each ground truth's supply in the one-to-many branch (supply=fixed; a dynamic supply overrides)
    loss_weight: float = 1.0  # lambda of the one-to-many losses
    matcher: str = "one_to_many"  # any matcher with a supply option (one_to_many | sinkhorn)
    normalizer: str = "positives"  # of the one-to-many losses (see loss.normalizer); H-DETR's is positives
    options: dict[str, Any] = field(default_factory=dict)  # hybrid.<matcher name>.<key>, typed by the registry


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: list[int] = field(default_factory=lambda: [200])  # epochs at which the LR is multiplied by gamma
    gamma: float = 0.1
    clip_max_norm: float = 0.1
    warmup_iters: int = 0
    lr_linear_proj_mult: float = 0.1  # lr factor of deformable attention's sampling offsets / reference points


@dataclass
class TrainConfig:
    epochs: int = 300
    eval_interval: int = 1  # evaluate every N epochs (and always after the last)
    amp: bool = False  # mixed precision on CUDA
    print_freq: int = 50
    max_iters_per_epoch: int = 0  # 0: the whole dataset
    # torch intra-op CPU threads per process (torch.set_num_threads); 0: PyTorch's default (OMP_NUM_THREADS, else
    # one per core). The tiny CPU presets use 1: their ops are too small to pay for waking a second thread
    threads: int = 0
    # hotcoco (default: pycocotools' numbers bit for bit, ~140x faster) | faster_coco_eval (to 1e-12, 6-10x
    # faster) | pycocotools (the reference); 5000 images, 2 CPU cores, tools/bench_eval.py (README)
    eval_backend: str = "hotcoco"

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"train.threads={self.threads}: use 0 (PyTorch's default) or a positive count")


@dataclass
class LogConfig:
    tb_dir: str | None = None  # TensorBoard directory; default <output_dir>/tb
    tensorboard: bool = True


@dataclass
class Config:
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)


def _registries() -> dict[type, Any]:
    from detr_ot.losses import CLASSIFICATION_LOSSES
    from detr_ot.matching import MATCHERS

    return {MatcherConfig: MATCHERS, LossConfig: CLASSIFICATION_LOSSES, HybridConfig: MATCHERS}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(v, inner, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "options"}
    registry = _registries().get(cls)
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key in fields:
            kwargs[key] = _coerce(value, hints[key], path)
        elif registry is not None and key in registry:
            opt_cls = registry.options(key)
            if opt_cls is None:
                raise ConfigError(f"{path}: {registry.kind} {key!r} takes no options")
            options[key] = _coerce(value, opt_cls, path)
        else:
            extra = f"; or a registered {registry.kind} name: {registry.names()}" if registry else ""
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(fields)}{extra}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:  # an options dataclass's own validation (__post_init__)
        raise ConfigError(f"{where or 'config'}: {err}") from err
    if registry is not None:
        obj.options = options
    return obj


def to_dict(cfg: Any) -> Any:
    """Plain nested dict of a config (options dataclasses flattened under their registry names)."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name == "options" and isinstance(value, dict):
                for name, opts in value.items():
                    out[name] = to_dict(opts)
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _merge(base: dict, child: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config, resolving ``_base_`` inheritance (recursively)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("_base_", None)
    if base is not None:
        data = _merge(load_yaml(path.parent / base), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and "," in value and not raw.startswith(("'", '"')):
        value = [yaml.safe_load(v) for v in value.split(",")]
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (with inheritance), apply ``key=value`` overrides, validate, return a :class:`Config`."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg)
    _fill_selected_options(cfg)
    return cfg


def _fill_selected_options(cfg: Config) -> None:
    """Give the selected matcher and loss their default options where none were set, so that a dumped
    config (``config.yaml`` of a run) records every value the run used, not only the ones overridden."""
    from detr_ot.losses import CLASSIFICATION_LOSSES
    from detr_ot.matching import MATCHERS

    for section, name, registry in ((cfg.matcher, cfg.matcher.name, MATCHERS),
                                    (cfg.loss, cfg.loss.cls, CLASSIFICATION_LOSSES),
                                    (cfg.hybrid, cfg.hybrid.matcher, MATCHERS)):
        if section is cfg.hybrid:
            if cfg.hybrid.num_queries > 0:  # off: its matcher is not built
                section.options[name] = hybrid_matcher_options(cfg.hybrid)
            continue
        opt_cls = registry.options(name)
        if opt_cls is not None and name not in section.options:
            section.options[name] = opt_cls()


def hybrid_matcher_options(hybrid: HybridConfig) -> Any:
    """The options of the one-to-many branch's matcher: those given under ``hybrid.<matcher>`` (else its
    defaults) with the supply fixed at ``hybrid.k``, unless they ask for the dynamic supply."""
    from detr_ot.matching import MATCHERS

    opt_cls = MATCHERS.options(hybrid.matcher)
    options = hybrid.options.get(hybrid.matcher) or opt_cls()
    if options.supply == "dynamic":
        return options
    return dataclasses.replace(options, supply="fixed", k=hybrid.k)


def validate(cfg: Config) -> None:
    """Cross-field checks that the schema alone cannot express."""
    from detr_ot.losses import CLASSIFICATION_LOSSES
    from detr_ot.matching import MATCHERS

    if cfg.matcher.name not in MATCHERS:
        raise ConfigError(f"matcher.name={cfg.matcher.name!r}; registered matchers: {MATCHERS.names()}")
    if cfg.loss.cls not in CLASSIFICATION_LOSSES:
        raise ConfigError(f"loss.cls={cfg.loss.cls!r}; registered: {CLASSIFICATION_LOSSES.names()}")
    if cfg.model.head not in ("auto", "softmax", "sigmoid"):
        raise ConfigError(f"model.head={cfg.model.head!r}; use auto, softmax or sigmoid")
    if cfg.data.dataset not in ("shapes", "coco"):
        raise ConfigError(f"data.dataset={cfg.data.dataset!r}; use shapes or coco")
    _validate_hybrid(cfg)


def _validate_hybrid(cfg: Config) -> None:
    from detr_ot.matching import MATCHERS

    h = cfg.hybrid
    for key, value in (("loss.normalizer", cfg.loss.normalizer), ("hybrid.normalizer", h.normalizer)):
        if value not in ("objects", "positives"):
            raise ConfigError(f"{key}={value!r}; use objects or positives")
    if h.num_queries < 0 or h.k < 1 or h.loss_weight < 0:
        raise ConfigError(f"hybrid: num_queries={h.num_queries} must be >= 0, k={h.k} >= 1, "
                          f"loss_weight={h.loss_weight} >= 0")
    if h.matcher not in MATCHERS:
        raise ConfigError(f"hybrid.matcher={h.matcher!r}; registered matchers: {MATCHERS.names()}")
    opt_cls = MATCHERS.options(h.matcher)
    if opt_cls is None or not hasattr(opt_cls(), "supply"):
        raise ConfigError(f"hybrid.matcher={h.matcher!r} has no one-to-many supply option; use a matcher whose "
                          "options have supply/k (e.g. one_to_many or sinkhorn)")
    given = h.options.get(h.matcher)
    if given is not None and given.supply == "fixed" and given.k != h.k:
        raise ConfigError(f"hybrid.{h.matcher}.k={given.k} and hybrid.k={h.k} disagree: set k once, as hybrid.k")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
