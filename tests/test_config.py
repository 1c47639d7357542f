"""Config loading: ``_base_`` inheritance, ``key=value`` overrides, strict validation with the list of valid
keys, the shipped configs, and the dump/load round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import COCO_YAML, SHAPES_YAML

from detr_ot.config import Config, ConfigError, dump_config, load_config, to_dict
from detr_ot.matching import MATCHERS


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ inheritance
def test_inheritance_merges_sections_recursively(tmp_path: Path) -> None:
    write(tmp_path / "common" / "root.yaml", "seed: 1\nmodel:\n  hidden_dim: 64\n  nheads: 2\n  num_queries: 7\n")
    write(tmp_path / "common" / "mid.yaml",
          "_base_: root.yaml\nmodel:\n  nheads: 4\noptim:\n  lr: 0.5\n  lr_drop: [3]\n")
    child = write(tmp_path / "exp" / "child.yaml",
                  "_base_: ../common/mid.yaml\nmodel:\n  num_queries: 9\ntrain:\n  epochs: 5\n")
    cfg = load_config(child)
    # root -> mid -> child: each level overrides only the keys it names; sibling keys survive the merge.
    assert cfg.seed == 1
    assert (cfg.model.hidden_dim, cfg.model.nheads, cfg.model.num_queries) == (64, 4, 9)
    assert cfg.optim.lr == 0.5 and cfg.optim.lr_drop == [3]
    assert cfg.train.epochs == 5
    # Keys no file names keep the dataclass defaults.
    assert cfg.model.enc_layers == 6 and cfg.train.eval_interval == 1 and cfg.optim.gamma == 0.1


def test_child_list_replaces_base_list(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "optim:\n  lr_drop: [10, 20, 30]\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\noptim:\n  lr_drop: [5]\n")
    assert load_config(child).optim.lr_drop == [5]


def test_missing_base_file_is_reported(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "_base_: nowhere.yaml\nseed: 3\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(child)


# ------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("train.epochs=7", lambda c: c.train.epochs, 7),
        ("seed=-3", lambda c: c.seed, -3),
        ("optim.lr=0.0005", lambda c: c.optim.lr, 5e-4),
        ("optim.lr=1e-4", lambda c: c.optim.lr, 1e-4),  # PyYAML alone reads 1e-4 (no dot) as a string
        ("optim.lr=2E-3", lambda c: c.optim.lr, 2e-3),
        ("optim.weight_decay=0", lambda c: c.optim.weight_decay, 0.0),
        ("optim.lr_drop=[3,5]", lambda c: c.optim.lr_drop, [3, 5]),
        ("optim.lr_drop=3,5,8", lambda c: c.optim.lr_drop, [3, 5, 8]),
        ("optim.lr_drop=4", lambda c: c.optim.lr_drop, [4]),
        ("optim.lr_drop=[]", lambda c: c.optim.lr_drop, []),
        ("model.aux_loss=false", lambda c: c.model.aux_loss, False),
        ("model.aux_loss=False", lambda c: c.model.aux_loss, False),
        ("train.amp=true", lambda c: c.train.amp, True),
        ("model.backbone_weights=/w/resnet50.pth", lambda c: c.model.backbone_weights, "/w/resnet50.pth"),
        ("model.backbone_weights=null", lambda c: c.model.backbone_weights, None),
        ("output_dir='runs/a,b'", lambda c: c.output_dir, "runs/a,b"),  # quoted: the comma is kept
        ("matcher.cost_giou=2", lambda c: c.matcher.cost_giou, 2.0),
        ("data.shapes.num_val=11", lambda c: c.data.shapes.num_val, 11),
    ],
)
def test_override_values_and_types(override: str, getter, expected) -> None:  # noqa: ANN001
    value = getter(load_config(SHAPES_YAML, [override]))
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list):
        assert all(type(v) is int for v in value)


def test_overrides_apply_in_order_and_beat_the_file() -> None:
    cfg = load_config(SHAPES_YAML, ["train.epochs=3", "model.hidden_dim=48", "train.epochs=9"])
    assert cfg.train.epochs == 9
    assert cfg.model.hidden_dim == 48
    assert cfg.model.num_queries == 20  # from shapes.yaml, untouched
    assert cfg.optim.lr == 4e-4  # shapes.yaml beats base.yaml's 1e-4


def test_override_without_equals_sign_is_an_error() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SHAPES_YAML, ["train.epochs"])


def test_override_below_a_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError, match="seed"):
        load_config(SHAPES_YAML, ["seed.value=1"])


# ------------------------------------------------------------------------------------------ validation
def test_unknown_nested_key_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHAPES_YAML, ["model.hiden_dim=64"])
    msg = str(info.value)
    assert "model.hiden_dim" in msg
    valid = [f.name for f in dataclasses.fields(type(Config().model))]
    for name in valid:
        assert name in msg, f"valid key {name!r} missing from: {msg}"


def test_unknown_top_level_key_lists_the_sections() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHAPES_YAML, ["epochs=3"])
    msg = str(info.value)
    assert "'epochs'" in msg
    for name in ("seed", "device", "output_dir", "data", "model", "matcher", "loss", "optim", "train", "log"):
        assert name in msg


def test_unknown_key_in_a_file_names_its_path(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "bad.yaml", f"_base_: {SHAPES_YAML}\ndata:\n  shapes:\n    num_trian: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file)
    msg = str(info.value)
    assert "data.shapes.num_trian" in msg and "num_train" in msg and "max_objects" in msg


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("matcher.name=hungarain", ["hungarain", "hungarian"]),
        ("loss.cls=focall", ["focall", "focal", "ce"]),
        ("model.head=softmaxx", ["softmaxx", "sigmoid"]),
        ("data.dataset=voc", ["voc", "coco", "shapes"]),
    ],
)
def test_unknown_registered_name_is_an_error(override: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHAPES_YAML, [override])
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("data.batch_size=true", "data.batch_size"),  # a bool is not an integer
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr=[1,2]", "optim.lr"),
        ("model.aux_loss=maybe", "model.aux_loss"),
        ("optim.lr_drop=[3,x]", "optim.lr_drop"),
        ("model.backbone=7", "model.backbone"),
        ("data.shapes=3", "data.shapes"),
    ],
)
def test_type_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SHAPES_YAML, [override])


def test_threads_key() -> None:
    """The tiny presets run one torch thread (README: faster on 2 cores); a negative count is refused."""
    assert load_config(SHAPES_YAML, []).train.threads == 1
    assert load_config(SHAPES_YAML, ["train.threads=0"]).train.threads == 0
    with pytest.raises(ConfigError, match=r"train\.threads=-1"):
        load_config(SHAPES_YAML, ["train.threads=-1"])


# ------------------------------------------------------------------------------------------ registry options
@dataclasses.dataclass
class _ToyOptions:
    epsilon: float = 0.1
    iters: int = 50


@pytest.fixture
def toy_matcher(monkeypatch: pytest.MonkeyPatch) -> str:
    """A matcher with its own options, registered for this test only (no trace left in MATCHERS)."""
    name = "toy_test_matcher"
    monkeypatch.setitem(MATCHERS._entries, name, lambda *a, **k: None)
    monkeypatch.setitem(MATCHERS._options, name, _ToyOptions)
    return name


def test_registered_matcher_options_are_typed_and_validated(toy_matcher: str) -> None:
    cfg = load_config(SHAPES_YAML, [f"matcher.name={toy_matcher}", f"matcher.{toy_matcher}.epsilon=1e-2"])
    opts = cfg.matcher.options[toy_matcher]
    assert isinstance(opts, _ToyOptions) and opts.epsilon == 0.01 and opts.iters == 50
    with pytest.raises(ConfigError) as info:
        load_config(SHAPES_YAML, [f"matcher.{toy_matcher}.epsilonn=1"])
    assert "epsilonn" in str(info.value) and "iters" in str(info.value)
    with pytest.raises(ConfigError, match="takes no options"):
        load_config(SHAPES_YAML, ["matcher.hungarian.foo=1"])


def test_round_trip_with_options(toy_matcher: str, tmp_path: Path) -> None:
    cfg = load_config(SHAPES_YAML, [f"matcher.name={toy_matcher}", f"matcher.{toy_matcher}.iters=7"])
    again = load_config(write(tmp_path / "dumped.yaml", dump_config(cfg)))
    assert again == cfg
    assert again.matcher.options[toy_matcher].iters == 7


# ------------------------------------------------------------------------------------------ shipped configs
def test_shapes_config_loads() -> None:
    cfg = load_config(SHAPES_YAML)
    assert cfg.data.dataset == "shapes" and cfg.data.transforms == "shapes"
    assert cfg.model.backbone == "tiny" and cfg.model.pretrained is False and cfg.model.backbone_weights is None
    m = cfg.model
    assert (m.hidden_dim, m.enc_layers, m.dim_feedforward, m.dec_layers) == (128, 1, 256, 3)
    assert cfg.model.dropout == 0.0 and cfg.model.aux_loss is True
    assert cfg.model.query_type == "anchor" and cfg.model.anchor_sigma > 0
    assert cfg.matcher.name == "hungarian" and cfg.loss.cls == "focal"
    assert cfg.data.shapes.num_train > 0 and cfg.data.shapes.num_val > 0


def test_shapes_ablation_config_is_the_shapes_preset_shortened() -> None:
    base, abl = load_config(SHAPES_YAML), load_config(SHAPES_YAML.parent / "shapes_ablation.yaml")
    assert abl.model.backbone == base.model.backbone and abl.model.query_type == base.model.query_type
    assert abl.matcher == base.matcher and abl.loss == base.loss and abl.data.shapes == base.data.shapes
    assert 0 < abl.train.max_iters_per_epoch < base.data.shapes.num_train // base.data.batch_size
    assert max(abl.optim.lr_drop) < abl.train.epochs
    # The model the committed docs/ablation figures were measured with, whatever the preset becomes.
    m = abl.model
    assert (m.tiny_widths, m.hidden_dim, m.enc_layers, m.dim_feedforward, m.dec_layers) == ([16, 32, 64, 128], 128, 2,
                                                                                            512, 3)
    assert (m.num_queries, m.dropout, m.anchor_sigma) == (20, 0.0, 0.5)


def test_detr_r50_coco_config_has_the_paper_hyperparameters() -> None:
    cfg = load_config(COCO_YAML)
    m, o = cfg.model, cfg.optim
    assert cfg.data.dataset == "coco" and cfg.data.transforms == "coco"
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.batch_size) == ("train2017", "val2017", 2)
    assert m.backbone == "resnet50" and m.pretrained is True
    assert (m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward) == (256, 8, 6, 6, 2048)
    assert (m.dropout, m.num_queries, m.aux_loss) == (0.1, 100, True)
    assert (o.lr, o.lr_backbone, o.weight_decay, o.clip_max_norm) == (1e-4, 1e-5, 1e-4, 0.1)
    assert (cfg.train.epochs, o.lr_drop) in ((500, [400]), (150, [100]))
    assert (cfg.matcher.cost_class, cfg.matcher.cost_bbox, cfg.matcher.cost_giou) == (1.0, 5.0, 2.0)
    assert (cfg.loss.cls_weight, cfg.loss.bbox_weight, cfg.loss.giou_weight, cfg.loss.eos_coef) == (1, 5, 2, 0.1)


def test_dumped_config_records_the_selected_options() -> None:
    """A run's config.yaml holds every option of its matcher and loss, so a later change of defaults cannot
    change what an old config means."""
    from detr_ot.losses.ranking_cls import RSOptions
    from detr_ot.matching.gu import GUOptions

    d = to_dict(load_config(None, ["matcher.name=gu", "loss.cls=rs", "loss.rs.delta=0.25"]))
    assert d["matcher"]["gu"] == to_dict(GUOptions())
    assert d["loss"]["rs"] == {**to_dict(RSOptions()), "delta": 0.25}
    assert "sinkhorn" not in d["matcher"] and "alrp" not in d["loss"]


@pytest.mark.parametrize("path", [SHAPES_YAML, COCO_YAML], ids=["shapes", "detr_r50_coco"])
def test_resolved_config_round_trips(path: Path, tmp_path: Path) -> None:
    overrides = ["optim.lr_drop=3,5", "model.backbone_weights=/x/w.pth", "train.amp=true", "seed=5"]
    cfg = load_config(path, overrides)
    text = dump_config(cfg)
    again = load_config(write(tmp_path / "config.yaml", text))
    assert again == cfg
    assert dump_config(again) == text
    assert to_dict(again)["optim"]["lr_drop"] == [3, 5]


# ------------------------------------------------------------------------------------------ shipped configs
ALL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.stem for p in ALL_CONFIGS])
def test_every_shipped_config_builds_its_model_and_criterion(path: Path) -> None:
    """Each file under configs/ loads and builds what it names: the model family of ``model.arch``, the matcher
    of ``matcher.name``, the loss of ``loss.cls``; a tiny-backbone preset's model answers a 64 px batch with one
    ``num_queries`` x K prediction per decoder layer (R50 configs are built without weights and not run)."""
    import torch

    from detr_ot.build import build_criterion, build_model
    from detr_ot.losses import CLASSIFICATION_LOSSES
    from detr_ot.matching import MATCHERS
    from detr_ot.models import DETR, DeformableDETR

    cfg = load_config(path, ["model.pretrained=false"])
    model = build_model(cfg, num_classes=3)
    assert isinstance(model, {"detr": DETR, "deformable": DeformableDETR}[cfg.model.arch])
    criterion = build_criterion(cfg, num_classes=3)
    assert isinstance(criterion.matcher, MATCHERS.get(cfg.matcher.name))
    assert isinstance(criterion.cls_loss, CLASSIFICATION_LOSSES.get(cfg.loss.cls))
    if cfg.model.backbone != "tiny":
        return
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    k = 3 if criterion.cls_loss.head == "sigmoid" else 4
    assert out["pred_logits"].shape == (2, cfg.model.num_queries, k)
    assert out["pred_boxes"].shape == (2, cfg.model.num_queries, 4)
    assert len(out["aux_outputs"]) == cfg.model.dec_layers - 1


def test_small_object_deformable_preset_uses_the_deformable_presets_model() -> None:
    """configs/shapes_small_deformable.yaml repeats configs/shapes_deformable.yaml's model block (the data differ):
    the two must not drift apart, or the small-object comparison no longer measures the preset's model."""
    root = Path(__file__).resolve().parents[1] / "configs"
    small = dataclasses.asdict(load_config(root / "shapes_small_deformable.yaml").model)
    preset = dataclasses.asdict(load_config(root / "shapes_deformable.yaml").model)
    assert small.pop("num_queries") == 40
    preset.pop("num_queries")
    assert small == preset
