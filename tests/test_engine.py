"""End-to-end tests of the engine and tools/train.py: a short training run and its outputs, exact resume
after an interruption, atomic checkpoints, NaN losses, eval-only on a COCO-style directory, offline
pretrained weights, evaluation invariant to the evaluation batch size, and bad input.

Everything runs a tiny DETR on the session's tiny shapes dataset (see conftest.py), single-threaded: on a
shared 2-core machine torch's default of 2 intra-op threads is ~10x slower than 1 when the cores are busy.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import COCO_YAML, SHAPES_YAML, read_log, tiny_overrides

from detr_ot.build import build_criterion, build_model, build_postprocess
from detr_ot.config import dump_config, load_config
from detr_ot.data.build import build_loader
from detr_ot.data.coco import CocoDetection
from detr_ot.data.collate import collate_batch
from detr_ot.data.shapes import ensure_shapes_dataset, generate_shapes
from detr_ot.data.transforms import build_transforms
from detr_ot.engine import trainer
from detr_ot.engine.checkpoint import load_checkpoint, save_checkpoint
from detr_ot.engine.trainer import NonFiniteLossError, evaluate, run
from detr_ot.losses.criterion import SetCriterion
from detr_ot.models import BackboneWeightsError, build_backbone

COCO_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
BOX_SPREAD = 0.3
LOSS_TERMS = ["loss", "loss_cls", "loss_bbox", "loss_giou", "class_error", "cardinality_error"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_state_dicts_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=atol), (
            f"{key}: max |diff| = {(a[key].double() - b[key].double()).abs().max().item():.3g}"
        )


def assert_optimizer_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, slots in a["state"].items():
        for name, value in slots.items():
            other = b["state"][index][name]
            assert torch.allclose(torch.as_tensor(value).double(), torch.as_tensor(other).double(), atol=atol), (
                f"optimizer state {index}.{name} differs"
            )


def cli_args(overrides: list[str], *flags: str) -> list[str]:
    return ["--config", str(SHAPES_YAML), "--no-progress", *flags, *overrides]


# ----------------------------------------------------------------------------------------------------------
# The reference run: 3 uninterrupted epochs with TensorBoard on. The epoch-0 and epoch-1 checkpoints are
# copied aside as they are written, for the --resume test.


@pytest.fixture(scope="module")
def reference(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("reference")
    out = base / "run"
    overrides = tiny_overrides(shapes_root, out, "log.tensorboard=true", epochs=3)
    cfg = load_config(SHAPES_YAML, overrides)
    real_save = trainer.save_checkpoint

    def save_and_copy(path: Path, state: dict) -> None:
        real_save(path, state)
        shutil.copy(path, base / f"epoch{state['epoch']}.pth")

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "save_checkpoint", save_and_copy)
        record = run(cfg, progress=False)
    seconds = time.perf_counter() - t0
    return SimpleNamespace(out=out, base=base, cfg=cfg, overrides=overrides, record=record, log=read_log(out),
                           seconds=seconds)


def test_short_training_run_loss_decreases(reference: SimpleNamespace) -> None:
    log = reference.log
    assert [r["epoch"] for r in log] == [0, 1, 2]
    first, last = log[0]["train_loss"], log[-1]["train_loss"]
    assert last < 0.97 * first, f"train_loss did not decrease: {[r['train_loss'] for r in log]}"
    assert log[-1]["test_loss"] < log[0]["test_loss"]


def test_log_lines_have_the_documented_fields(reference: SimpleNamespace) -> None:
    cfg = reference.cfg
    n_parameters = sum(p.numel() for p in build_model(cfg, 3).parameters() if p.requires_grad)
    total = 0.0
    for record in reference.log:
        for term in LOSS_TERMS:
            for prefix in ("train_", "test_"):
                value = record[prefix + term]
                assert isinstance(value, float) and math.isfinite(value), (prefix + term, value)
        # The logged total is the weighted sum of the logged terms (1 decoder layer: no auxiliary terms).
        for prefix in ("train_", "test_"):
            weighted = (cfg.loss.cls_weight * record[prefix + "loss_cls"] + cfg.loss.bbox_weight *
                        record[prefix + "loss_bbox"] + cfg.loss.giou_weight * record[prefix + "loss_giou"])
            assert record[prefix + "loss"] == pytest.approx(weighted, rel=1e-5)
        assert record["train_lr"] == pytest.approx(1e-3)
        stats = record["test_coco_eval_bbox"]
        assert len(stats) == 12 and all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in stats)
        assert record["epoch_time"] > 0
        total += record["epoch_time"]
        assert record["elapsed"] == pytest.approx(total, rel=1e-9)
        assert record["n_parameters"] == n_parameters
    assert reference.record == reference.log[-1]
    assert reference.seconds >= reference.log[-1]["elapsed"]


def test_run_writes_config_checkpoint_finished_and_tensorboard(reference: SimpleNamespace) -> None:
    out, cfg = reference.out, reference.cfg
    assert load_config(out / "config.yaml") == cfg
    assert (out / "config.yaml").read_text() == dump_config(cfg)
    assert json.loads((out / "finished.json").read_text())["epochs"] == 3
    state = load_checkpoint(out / "checkpoint.pth")
    assert state["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "rng", "config", "elapsed"} <= state.keys()
    assert state["elapsed"] == pytest.approx(reference.log[-1]["elapsed"])
    assert not list(out.glob("*.tmp"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out / 'tb'}"
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    train_loss = acc.Scalars("train/train_loss")
    assert [e.step for e in train_loss] == [0, 1, 2]
    assert [e.value for e in train_loss] == pytest.approx([r["train_loss"] for r in reference.log], rel=1e-6)
    ap50 = acc.Scalars("coco/AP50")
    assert [e.value for e in ap50] == pytest.approx([r["test_coco_eval_bbox"][1] for r in reference.log])


def test_finished_run_exits_at_once(reference: SimpleNamespace, train_cli, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    def must_not_run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a finished run trained or evaluated again")

    monkeypatch.setattr(trainer, "train_one_epoch", must_not_run)
    monkeypatch.setattr(trainer, "evaluate", must_not_run)
    out = reference.out
    before = {name: file_digest(out / name) for name in ("log.txt", "checkpoint.pth", "finished.json")}
    t0 = time.perf_counter()
    assert train_cli.main(cli_args(reference.overrides)) == 0
    assert time.perf_counter() - t0 < 30
    assert "nothing to train" in capsys.readouterr().out
    assert {name: file_digest(out / name) for name in before} == before


# ----------------------------------------------------------------------------------------------------------
# Resume


def test_resume_after_interruption_matches_uninterrupted_run(
    reference: SimpleNamespace, tiny, tmp_path: Path, train_cli, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "run"
    overrides = tiny(epochs=3)
    real_save = trainer.save_checkpoint

    def crash_at_epoch_1(path: Path, state: dict) -> None:
        # Killed after epoch 1 was logged but before its checkpoint was written: the worst moment, since
        # the resumed run must redo epoch 1 without duplicating its log line.
        if state["epoch"] == 1:
            raise RuntimeError("simulated crash")
        real_save(path, state)

    with monkeypatch.context() as mp:
        mp.setattr(trainer, "save_checkpoint", crash_at_epoch_1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(load_config(SHAPES_YAML, overrides), progress=False)
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0
    assert not (out / "finished.json").exists()

    capsys.readouterr()
    assert train_cli.main(cli_args(overrides)) == 0
    assert "epoch 0 done" in capsys.readouterr().out
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert log[0]["elapsed"] < log[1]["elapsed"] < log[2]["elapsed"]
    assert (out / "finished.json").exists()
    assert not (out / "tb").exists()  # log.tensorboard=false

    # Same seed and data order: identical to the uninterrupted run, epoch by epoch and in the final state.
    for mine, ref in zip(log, reference.log, strict=True):
        for key in ("train_loss", "train_loss_cls", "train_loss_bbox", "train_loss_giou", "test_loss"):
            assert mine[key] == pytest.approx(ref[key], rel=0, abs=1e-6), (mine["epoch"], key)
        assert mine["test_coco_eval_bbox"] == pytest.approx(ref["test_coco_eval_bbox"], abs=1e-9)
    final = load_checkpoint(out / "checkpoint.pth")
    expected = load_checkpoint(reference.out / "checkpoint.pth")
    assert final["epoch"] == expected["epoch"] == 2
    assert_state_dicts_close(final["model"], expected["model"])
    assert_optimizer_states_close(final["optimizer"], expected["optimizer"])
    assert final["scheduler"] == expected["scheduler"]


@pytest.mark.slow
def test_resume_is_exact_with_dataloader_workers(tiny, tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(load_config(SHAPES_YAML, tiny("data.num_workers=2", out=whole, epochs=2)), progress=False)
    run(load_config(SHAPES_YAML, tiny("data.num_workers=2", out=split, epochs=1)), progress=False)
    run(load_config(SHAPES_YAML, tiny("data.num_workers=2", out=split, epochs=2)), progress=False)
    assert [r["epoch"] for r in read_log(split)] == [0, 1]
    assert read_log(split)[0]["train_loss"] == read_log(whole)[0]["train_loss"]
    assert read_log(split)[1]["train_loss"] == pytest.approx(read_log(whole)[1]["train_loss"], rel=0, abs=1e-6)
    assert_state_dicts_close(load_checkpoint(split / "checkpoint.pth")["model"],
                             load_checkpoint(whole / "checkpoint.pth")["model"])


def test_resume_flag_continues_from_the_given_checkpoint(
    reference: SimpleNamespace, tiny, tmp_path: Path, train_cli, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "elsewhere"
    overrides = tiny(out=out, epochs=3)
    assert train_cli.main(cli_args(overrides, "--resume", str(reference.base / "epoch1.pth"))) == 0
    assert "epoch 1 done" in capsys.readouterr().out
    log = read_log(out)
    assert [r["epoch"] for r in log] == [2]
    assert log[0]["train_loss"] == pytest.approx(reference.log[2]["train_loss"], rel=0, abs=1e-6)
    assert_state_dicts_close(load_checkpoint(out / "checkpoint.pth")["model"],
                             load_checkpoint(reference.out / "checkpoint.pth")["model"])


def test_eval_only_with_resume_reproduces_the_logged_evaluation(
    reference: SimpleNamespace, tiny, tmp_path: Path, train_cli, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eval"
    overrides = tiny(out=out, epochs=3)
    args = cli_args(overrides, "--eval-only", "--resume", str(reference.out / "checkpoint.pth"))
    assert train_cli.main(args) == 0
    printed = parse_coco_line(capsys.readouterr().out)
    assert printed == pytest.approx(reference.log[-1]["test_coco_eval_bbox"], abs=5e-5)
    assert not (out / "checkpoint.pth").exists() and not (out / "log.txt").exists()


# ----------------------------------------------------------------------------------------------------------
# Checkpoint atomicity


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt" / "checkpoint.pth"
    good = {"epoch": 0, "weights": torch.arange(1000, dtype=torch.float32)}
    save_checkpoint(path, good)
    real_save = torch.save

    for error in (OSError("No space left on device"), KeyboardInterrupt()):
        def crash_mid_write(obj, f, *args, _error=error, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            f.write(b"\x80\x02partial checkpoint bytes" * 64)
            f.flush()
            raise _error

        monkeypatch.setattr(torch, "save", crash_mid_write)
        with pytest.raises(type(error)):
            save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(1000)})
        monkeypatch.setattr(torch, "save", real_save)
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pth"]
        state = load_checkpoint(path)
        assert state["epoch"] == 0 and torch.equal(state["weights"], good["weights"])

    save_checkpoint(path, {"epoch": 2, "weights": torch.ones(3)})
    assert load_checkpoint(path)["epoch"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pth"]

    path.write_bytes(path.read_bytes()[:50])  # a file truncated by something else
    with pytest.raises(RuntimeError, match="checkpoint.pth"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------------------
# NaN loss


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny, tmp_path: Path, train_cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    overrides = tiny(epochs=3)
    current = {"epoch": -1}
    real_epoch, real_layer_losses = trainer.train_one_epoch, SetCriterion.layer_losses

    def tracking_epoch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        current["epoch"] = args[5]  # train_one_epoch(model, criterion, loader, optimizer, device, epoch, ...)
        return real_epoch(*args, **kwargs)

    def nan_giou_from_epoch_1(self, outputs, targets, num_boxes, **kwargs):  # noqa: ANN001, ANN003, ANN202
        losses, assignment = real_layer_losses(self, outputs, targets, num_boxes, **kwargs)
        if self.training and current["epoch"] >= 1:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses, assignment

    monkeypatch.setattr(trainer, "train_one_epoch", tracking_epoch)
    monkeypatch.setattr(SetCriterion, "layer_losses", nan_giou_from_epoch_1)

    with pytest.raises(NonFiniteLossError) as info:
        run(load_config(SHAPES_YAML, overrides), progress=False)
    message = str(info.value)
    assert "['loss_giou']" in message and "epoch 1" in message, message
    state = load_checkpoint(out / "checkpoint.pth")
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_log(out)] == [0]
    assert not (out / "finished.json").exists()

    # The same through the CLI (which resumes from epoch 0 and hits the NaN again): exit code 1, a message.
    digest = file_digest(out / "checkpoint.pth")
    capsys.readouterr()
    assert train_cli.main(cli_args(overrides)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "loss_giou" in err and "last good checkpoint" in err
    assert file_digest(out / "checkpoint.pth") == digest
    assert [r["epoch"] for r in read_log(out)] == [0]


# ----------------------------------------------------------------------------------------------------------
# Eval-only on a directory laid out like COCO, with the COCO config


def parse_coco_line(stdout: str) -> list[float]:
    lines = [line for line in stdout.splitlines() if line.startswith("COCO bbox:")]
    assert len(lines) == 1, f"expected one 'COCO bbox:' line in:\n{stdout[-3000:]}"
    pairs = re.findall(r"(\w+)=(-?\d+\.\d+)", lines[0])
    assert [name for name, _ in pairs] == COCO_NAMES, lines[0]
    return [float(value) for _, value in pairs]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train2017/, val2017/ and annotations/instances_{train,val}2017.json: 2 + 4 shapes images."""
    root = tmp_path_factory.mktemp("coco_layout") / "coco"
    ensure_shapes_dataset(root, num_train=2, num_val=4, seed=1, min_size=96, max_size=128, max_objects=3,
                          split_names=("train2017", "val2017"))
    assert (root / "annotations" / "instances_val2017.json").is_file() and (root / "val2017").is_dir()
    return root


def check_eval_only_on_coco_layout(train_cli, capsys, root: Path, out: Path, *extra: str) -> list[float]:
    args = ["--config", str(COCO_YAML), "--eval-only", "--output-dir", str(out), "--device", "cpu",
            "--no-progress", f"data.root={root}", "model.pretrained=false", "data.eval_batch_size=2", *extra]
    assert train_cli.main(args) == 0
    stats = parse_coco_line(capsys.readouterr().out)
    # Objects are at most 64x64 px < 96^2: no "large" ground truth, so COCO reports -1 for APl and ARl.
    assert stats[5] == stats[11] == -1.0
    assert all(0.0 <= s <= 1.0 for i, s in enumerate(stats) if i not in (5, 11))

    # Independent check: pycocotools on the detections the run wrote.
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = json.loads((out / "detections.json").read_text())
    ann_file = root / "annotations" / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        assert len(detections) == 100 * len(gt.getImgIds())  # softmax head: one detection per query
        assert {d["category_id"] for d in detections} <= set(gt.getCatIds())
        coco_eval = COCOeval(gt, gt.loadRes(detections), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert stats == pytest.approx(list(coco_eval.stats), abs=5e-5)
    return stats


def test_eval_only_on_coco_layout_small_inputs(coco_root: Path, tmp_path: Path, train_cli, capsys) -> None:
    """The COCO config end to end, but without the 800-px evaluation resize (keeps the R50 fast on CPU)."""
    check_eval_only_on_coco_layout(train_cli, capsys, coco_root, tmp_path / "out",
                                   "data.transforms=shapes", "data.num_workers=0")


@pytest.mark.slow
def test_eval_only_on_coco_layout_exact_command(coco_root: Path, tmp_path: Path, train_cli, capsys) -> None:
    """Acceptance 3 as written: the COCO config unchanged apart from the data root and no download."""
    check_eval_only_on_coco_layout(train_cli, capsys, coco_root, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# Pretrained backbone weights without network


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail every connection at once and put the Hugging Face hub in offline mode (no retry back-off)."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def check_pretrained_error_names_the_key(train_cli, capsys, tiny, backbone: str) -> None:
    args = cli_args(tiny(f"model.backbone={backbone}", "model.pretrained=true"), "--eval-only")
    code = train_cli.main(args)
    if code == 0:
        pytest.skip(f"{backbone} weights were obtained (network reachable or weights cached)")
    assert code == 1
    err = capsys.readouterr().err
    assert "model.backbone_weights" in err and backbone in err, err


@pytest.mark.usefixtures("no_network")
def test_pretrained_offline_names_the_weights_key(train_cli, capsys, tiny) -> None:
    try:
        build_backbone("resnet18", pretrained=True)
    except BackboneWeightsError as err:
        assert "model.backbone_weights" in str(err) and "resnet18" in str(err)
    else:
        pytest.skip("resnet18 weights are cached locally")
    check_pretrained_error_names_the_key(train_cli, capsys, tiny, "resnet18")


@pytest.mark.slow
def test_pretrained_without_network_names_the_weights_key(train_cli, capsys, tiny) -> None:
    """No patching: whatever the machine's network does (offline, huggingface_hub retries for ~1 min)."""
    check_pretrained_error_names_the_key(train_cli, capsys, tiny, "resnet50")


@pytest.mark.usefixtures("no_network")
def test_local_backbone_weights_load_without_network(tmp_path: Path, tiny, train_cli, capsys) -> None:
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)
    state = reference.state_dict()
    for key, value in state.items():  # distinctive BatchNorm statistics too (timm initialises them to 0/1)
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("running_mean"):
            value.normal_(0.0, 0.1)
    weights = tmp_path / "resnet18_local.pth"
    torch.save(state, weights)

    backbone = build_backbone("resnet18", pretrained=True, weights=str(weights))
    loaded = backbone.body.state_dict()
    # Everything but the classifier and BatchNorm's batch counters (the backbone's BatchNorm is frozen).
    assert {k for k in state if k not in loaded} == {"fc.weight", "fc.bias"} | {
        k for k in state if k.endswith("num_batches_tracked")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key

    features_only = tmp_path / "resnet18_features.pth"  # a features_only state dict works too
    torch.save(backbone.body.state_dict(), features_only)
    again = build_backbone("resnet18", pretrained=True, weights=str(features_only))
    assert torch.equal(again.body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])

    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        build_backbone("resnet18", pretrained=True, weights=str(tmp_path / "absent.pth"))

    # Through the CLI: model.pretrained=true plus the local file evaluates without network.
    args = cli_args(tiny("model.backbone=resnet18", "model.pretrained=true", f"model.backbone_weights={weights}"),
                    "--eval-only")
    assert train_cli.main(args) == 0, capsys.readouterr().err
    assert len(parse_coco_line(capsys.readouterr().out)) == 12


# ----------------------------------------------------------------------------------------------------------
# Evaluation invariant to the evaluation batch size


@pytest.fixture(scope="module")
def varied_val_set(tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    """8 validation images of 40..130 px: batches of 4 pad the small ones to a much larger canvas."""
    root = tmp_path_factory.mktemp("varied")
    ann = generate_shapes(root, "val", 8, seed=11, min_size=40, max_size=130, max_objects=4)
    return CocoDetection(root / "val", ann, transforms=build_transforms("shapes", train=False), train=False)


def random_model(tiny, backbone: str, num_queries: int = 50):  # noqa: ANN001, ANN201
    """A randomly initialised model, with BatchNorm shifts, whose boxes scatter around a typical object box
    (cx, cy, w, h) = (0.5, 0.5, 0.3, 0.3), so that some detections hit ground truth and the COCO numbers
    are not all zero."""
    cfg = load_config(SHAPES_YAML, tiny(f"model.backbone={backbone}", f"model.num_queries={num_queries}",
                                         "model.query_type=learned", "loss.cls=ce"))
    torch.manual_seed(0)
    model = build_model(cfg, 3).eval()
    last = model.bbox_embed.layers[-1]
    with torch.no_grad():
        # Trained-like BatchNorm: a non-zero shift turns zero padding into non-zero activations, which
        # then leak into the valid region unless the backbone masks every conv input.
        for module in model.backbone.modules():
            if hasattr(module, "running_mean"):
                module.running_mean.normal_(0.0, 0.3)
                module.bias.normal_(0.0, 0.3)
        last.weight.mul_(BOX_SPREAD)
        last.bias.copy_(torch.logit(torch.tensor([0.5, 0.5, 0.3, 0.3])))
    return cfg, model


class InFloat64(torch.nn.Module):
    """``model`` in float64 on float64 images. Its outputs for an image then agree to ~1e-16 whatever the batch
    padding, so the evaluation's float32 casts of them have the same bits, and COCO numbers, which jump where
    two scores swap or an IoU crosses a threshold, can be compared exactly on any CPU. (In float32 the padding
    moves the scores here by up to 4 ulps, more than the 2 ulps between the closest two of the 400.)"""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.double()

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        return self.model(images.double(), mask)


def test_coco_metrics_do_not_depend_on_eval_batch_size(varied_val_set: CocoDetection, tiny,
                                                       tmp_path: Path) -> None:
    cfg, model = random_model(tiny, "tiny")
    model = InFloat64(model)
    criterion, postprocess = build_criterion(cfg, 3), build_postprocess(cfg)
    device = torch.device("cpu")
    results = {}
    for batch_size in (1, 4):
        loader = build_loader(varied_val_set, batch_size, False, 0)
        _, stats, evaluator = evaluate(model, criterion, postprocess, loader, varied_val_set, device, progress=False)
        evaluator.dump(tmp_path / f"det{batch_size}.json")
        results[batch_size] = (stats, json.loads((tmp_path / f"det{batch_size}.json").read_text()))
    (stats1, det1), (stats4, det4) = results[1], results[4]
    assert any(s > 0 for s in stats1), f"all-zero COCO stats make this comparison vacuous: {stats1}"
    assert stats1 == pytest.approx(stats4, rel=0, abs=1e-9)
    assert len(det1) == len(det4) == 50 * len(varied_val_set)
    assert [(d["image_id"], d["category_id"]) for d in det1] == [(d["image_id"], d["category_id"]) for d in det4]
    np.testing.assert_allclose([d["bbox"] for d in det1], [d["bbox"] for d in det4], rtol=0, atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in det1], [d["score"] for d in det4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_raw_outputs_do_not_depend_on_batch_companions(varied_val_set: CocoDetection, tiny,
                                                       backbone: str) -> None:
    _, model = random_model(tiny, backbone)
    # Sizes one pixel past a multiple of the backbone strides (16 and 32): the last feature cell is mostly
    # padding, where leaks from padded pixels are largest. Contents: real images, resized.
    def resized(index: int, h: int, w: int) -> torch.Tensor:
        image = varied_val_set[index][0]
        return torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear")[0]

    small, large = resized(0, 97, 65), resized(1, 150, 170)
    alone_images, alone_mask, _ = collate_batch([(small, {})])
    batch_images, batch_mask, _ = collate_batch([(large, {}), (small, {})])
    assert batch_images.shape[-2:] == (160, 192) and alone_images.shape[-2:] == (128, 96)
    with torch.no_grad():
        alone = model(alone_images, alone_mask)
        together = model(batch_images, batch_mask)
        unpadded = model(small[None], torch.zeros(1, 97, 65, dtype=torch.bool))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(together[key][1], alone[key][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(unpadded[key][0], alone[key][0], rtol=0, atol=1e-5)
    for aux_alone, aux_together in zip(alone["aux_outputs"], together["aux_outputs"], strict=True):
        torch.testing.assert_close(aux_together["pred_boxes"][1], aux_alone["pred_boxes"][0], rtol=0, atol=1e-5)

# ----------------------------------------------------------------------------------------------------------
# Bad input through tools/train.py


def test_unknown_config_key_exits_with_a_clear_message(train_cli, capsys, tiny, tmp_path: Path) -> None:
    assert train_cli.main(cli_args(tiny("model.hiden_dim=64"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.hiden_dim" in err and "hidden_dim" in err
    assert not (tmp_path / "run").exists()


def test_missing_config_file_exits_with_a_clear_message(train_cli, capsys, tmp_path: Path) -> None:
    assert train_cli.main(["--config", str(tmp_path / "nope.yaml"), "--no-progress"]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_missing_annotation_file_exits_with_a_clear_message(
    train_cli, capsys, tiny, shapes_root: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "shapes_copy"
    shutil.copytree(shapes_root, broken)
    (broken / "annotations" / "instances_val.json").unlink()
    overrides = tiny(f"data.root={broken}")
    assert train_cli.main(cli_args(overrides)) == 1
    err = capsys.readouterr().err
    assert "instances_val.json" in err and "not found" in err, err
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_missing_coco_annotations_exit_with_the_expected_layout(train_cli, capsys, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    args = ["--config", str(COCO_YAML), "--eval-only", "--output-dir", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress", f"data.root={root}", "model.pretrained=false"]
    assert train_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "instances_val2017.json" in err and "data.root" in err, err


def test_negative_box_in_annotations_exits_with_the_record(
    train_cli, capsys, tiny, shapes_root: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "shapes_copy"
    shutil.copytree(shapes_root, broken)
    ann_file = broken / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    bad = data["annotations"][3]
    bad["bbox"][2] = -5.0
    ann_file.write_text(json.dumps(data))
    assert train_cli.main(cli_args(tiny(f"data.root={broken}"))) == 1
    err = capsys.readouterr().err
    assert "instances_train.json" in err and f"annotation id {bad['id']}" in err, err
