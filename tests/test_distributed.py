"""Distributed training and evaluation on CPU: 2 processes (gloo) spawned from pytest, initialised from the
environment variables torchrun sets (``detr_ot.distributed.init_from_env``).

1. Distributed evaluation of a fixed model on a 7-image split (not divisible by 2: the DistributedSampler
   repeats an image) gives exactly the single-process 12 numbers, detections and precision array, for
   evaluation batch sizes 1 and 3, every backend and both ``per_image`` strategies; likewise for
   synthetic detections with crowd boxes, empty images and duplicates across uneven shards.
2. Two processes of batch b train k steps to the parameters of one process of batch 2b (dropout off, same
   data), for ce, focal, the ranking losses and hybrid matching's one-to-many branch, with steps where one
   process has no box at all.
3. (tests/test_evaluation.py: each backend gives pycocotools' numbers on several hundred synthetic images.)
4. A 2-process run interrupted during its second epoch resumes to the state of an uninterrupted run
   (parameters, optimizer, log, per-rank RNG streams, aLRP's self-balance state, identical on both ranks).

Each test spawns its processes once (a module fixture) and reads what they wrote; the workers are
top-level functions of this module, so that ``spawn`` can import them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, SHAPES_YAML, TINY_SHAPES, read_log, tiny_overrides
from torch import nn
from torch.utils.data import DistributedSampler

from detr_ot import distributed as dist
from detr_ot.build import build_criterion, build_model, build_optimizer, build_postprocess
from detr_ot.config import load_config
from detr_ot.data.build import build_dataset, build_loader
from detr_ot.data.coco import CocoDetection
from detr_ot.data.collate import collate_batch
from detr_ot.data.shapes import ensure_shapes_dataset
from detr_ot.data.transforms import build_transforms
from detr_ot.engine import trainer
from detr_ot.engine.checkpoint import load_checkpoint
from detr_ot.evaluation import CocoEvaluator
from detr_ot.evaluation.synthetic import coco_from_dataset, rows_to_predictions, synthetic_coco

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
BACKENDS = ("pycocotools", "faster_coco_eval", "hotcoco")
SPAWN_TIMEOUT_S = 300.0
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# Process launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(worker: Callable[..., None], *args: Any, timeout: float = SPAWN_TIMEOUT_S) -> None:
    """Run ``worker(rank, port, *args)`` on WORLD fresh processes; re-raise a worker's error, and kill them all
    if they have not finished within ``timeout`` seconds (a hung collective fails the test, never the run)."""
    ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__}: {WORLD} processes still running after {timeout:.0f} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()


def init_worker(rank: int, port: int) -> None:
    """What torchrun does for a process, then the engine's own initialisation (gloo on CPU)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_from_env("cpu")
    assert dist.is_dist() and dist.world_size() == WORLD and dist.rank() == rank


def finish_worker() -> None:
    if dist.is_dist():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# 1. Distributed evaluation


class GridDetector(nn.Module):
    """A fixed detector without weights whose detections of an image depend on that image alone, bit for bit
    (whatever its batch companions and padding): square boxes on a grid of centres and sizes, scored per
    class by the mean absolute deviation of the pixels inside the box (one colour channel per class) from the
    image mean. Non-trivial COCO numbers on the shapes dataset, without training.

    Bit for bit through the post-processing too: its float32 ``sigmoid`` runs a SIMD body over blocks of
    2 x vector width elements (16 floats with AVX2, 32 with AVX-512) and a scalar loop over the rest, and
    the two round differently (Sleef's vector ``exp`` vs libm's ``expf``). So the queries are padded with
    ``PAD_LOGIT`` queries (never among the top scores) to a multiple of ``QUERY_BLOCK``: every image then
    fills whole blocks, at any batch size, and no score comes from the scalar loop on any x86-64 CPU."""

    QUERY_BLOCK = 64  # Q * K a multiple of 64 floats: whole SIMD blocks for vectors of up to 1024 bits
    PAD_LOGIT = -30.0

    def __init__(self, num_classes: int, grid: int = 6, sizes: tuple[float, ...] = (0.15, 0.25, 0.4)) -> None:
        super().__init__()
        self.num_classes = num_classes
        centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
        cy, cx, side = torch.meshgrid(centres, centres, torch.tensor(sizes, dtype=torch.float64), indexing="ij")
        self.register_buffer("boxes", torch.stack([cx, cy, side, side], -1).reshape(-1, 4))
        self.num_pad = -len(self.boxes) % self.QUERY_BLOCK

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = []
        b = self.boxes
        for image, pad in zip(images, mask, strict=True):
            h, w = int((~pad[:, 0]).sum()), int((~pad[0]).sum())
            x = image[:, :h, :w].double()
            deviation = (x - x.mean((1, 2), keepdim=True)).abs()
            integral = nn.functional.pad(deviation.cumsum(1).cumsum(2), (1, 0, 1, 0))
            x0 = ((b[:, 0] - b[:, 2] / 2) * w).round().long().clamp(0, w - 1)
            x1 = ((b[:, 0] + b[:, 2] / 2) * w).round().long().clamp(max=w).maximum(x0 + 1)
            y0 = ((b[:, 1] - b[:, 3] / 2) * h).round().long().clamp(0, h - 1)
            y1 = ((b[:, 1] + b[:, 3] / 2) * h).round().long().clamp(max=h).maximum(y0 + 1)
            sums = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
            means = (sums / ((y1 - y0) * (x1 - x0))).T  # (Q, 3)
            logits.append(means[:, torch.arange(self.num_classes) % 3] * 4.0 - 2.0)
        pad_logits = torch.full((len(images), self.num_pad, self.num_classes), self.PAD_LOGIT, dtype=torch.float64)
        boxes = torch.cat([b, b[:1].expand(self.num_pad, -1)]).expand(len(images), -1, -1)
        return {"pred_logits": torch.cat([torch.stack(logits), pad_logits], 1).float(), "pred_boxes": boxes.float()}


def eval_split(root: Path) -> tuple[Any, CocoDetection]:
    """(config, 7-image validation split): ``root`` holds a shapes dataset with 7 validation images."""
    cfg = load_config(SHAPES_YAML, tiny_overrides(root, root.parent / "unused", "data.shapes.num_train=2",
                                                  "data.shapes.num_val=7", "loss.cls=focal"))
    return cfg, build_dataset(cfg.data, "val")


def quiet_evaluate(*args: Any, **kwargs: Any) -> tuple[dict, list[float], CocoEvaluator]:
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer.evaluate(*args, **kwargs)


def synthetic_case() -> tuple[Any, list[int], dict[int, dict[str, torch.Tensor]]]:
    """(GT COCO, label -> category id, predictions per image id): 151 images, crowd boxes, images without
    annotations or detections, tied scores."""
    data, detections = synthetic_coco(num_images=151, seed=5, num_categories=12, crowd_fraction=0.05,
                                      empty_fraction=0.05, detections_per_image=30, score_levels=20)
    coco = coco_from_dataset(data)
    cat_ids = [c["id"] for c in data["categories"]]
    to_label = {c: i for i, c in enumerate(cat_ids)}
    return coco, cat_ids, {i: rows_to_predictions(rows, to_label) for i, rows in detections.items()}


def synthetic_shard(ids: list[int], rank: int) -> list[int]:
    """Uneven shards with duplicates both ways: rank 1 repeats two of rank 0's images, rank 0 one of rank 1's
    (an image belongs to the lowest rank that saw it)."""
    return ids[0::2] + [ids[1]] if rank == 0 else ids[1::2] + [ids[0], ids[2]]


def _eval_worker(rank: int, port: int, root: str, out: str) -> None:
    init_worker(rank, port)
    try:
        cfg, dataset = eval_split(Path(root))
        model, postprocess = GridDetector(dataset.num_classes), build_postprocess(cfg)
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
        result: dict[str, Any] = {"shard": [dataset.ids[i] for i in sampler]}
        for backend in BACKENDS:
            for per_image in (True, False):
                for batch_size in (1, 3):
                    loader = build_loader(dataset, batch_size, False, 0, sampler=sampler)
                    _, stats, ev = quiet_evaluate(model, None, postprocess, loader, dataset, CPU, backend,
                                                  progress=False, per_image=per_image)
                    key = f"model/{backend}/{per_image}/{batch_size}"
                    result[key] = {"stats": stats}
                    if rank == 0:
                        result[key].update(records=ev._records(), precision=ev.coco_eval.eval["precision"])
        coco, cat_ids, predictions = synthetic_case()
        shard = synthetic_shard(sorted(predictions), rank)
        for backend in BACKENDS:
            for per_image in (True, False):
                ev = CocoEvaluator(coco, cat_ids, backend=backend)
                for start in range(0, len(shard), 3):  # batches of 3
                    ev.update({i: predictions[i] for i in shard[start:start + 3]})
                with contextlib.redirect_stdout(io.StringIO()):
                    stats = ev.evaluate_distributed(per_image=per_image)
                key = f"synthetic/{backend}/{per_image}"
                result[key] = {"stats": stats}
                if rank == 0:
                    result[key].update(img_ids=ev.img_ids, precision=ev.coco_eval.eval["precision"],
                                       recall=ev.coco_eval.eval["recall"])
        torch.save(result, Path(out) / f"eval{rank}.pt")
    finally:
        finish_worker()


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    base = tmp_path_factory.mktemp("dist_eval")
    root = base / "shapes7"
    params = {**TINY_SHAPES, "num_train": 2, "num_val": 7}
    ensure_shapes_dataset(root, **params)
    spawn(_eval_worker, str(root), str(base))
    return root, [torch.load(base / f"eval{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_distributed_evaluation_equals_single_process(eval_runs: tuple[Path, list[dict]], backend: str,
                                                      per_image: bool, batch_size: int) -> None:
    root, parts = eval_runs
    cfg, dataset = eval_split(root)
    # The premise: 7 images on 2 ranks, so the sampler gives rank 1 a copy of rank 0's first image.
    shards = [p["shard"] for p in parts]
    assert len(shards[0]) == len(shards[1]) == 4 and shards[1][-1] == shards[0][0]
    assert sorted(set(shards[0]) | set(shards[1])) == dataset.ids

    model, postprocess = GridDetector(dataset.num_classes), build_postprocess(cfg)
    loader = build_loader(dataset, batch_size, False, 0)
    _, expected, ev = quiet_evaluate(model, None, postprocess, loader, dataset, CPU, backend, progress=False)
    assert expected[0] > 0 and expected[1] > 0 and expected[8] > 0, f"vacuous comparison: {expected}"

    key = f"model/{backend}/{per_image}/{batch_size}"
    for part in parts:
        assert part[key]["stats"] == expected  # exactly, on every rank
    assert parts[0][key]["records"] == ev._records()
    assert np.array_equal(parts[0][key]["precision"], ev.coco_eval.eval["precision"])

    # The test can fail: counting the padded copy of the repeated image twice changes the numbers.
    doubled = CocoEvaluator(dataset.coco, dataset.label_to_cat_id, backend=backend)
    doubled._results = dict(ev._results)
    first = shards[0][0]
    doubled._results[first] = np.concatenate([ev._results[first], ev._results[first]])
    with contextlib.redirect_stdout(io.StringIO()):
        assert doubled.evaluate() != expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_image", [True, False])
def test_distributed_evaluation_of_synthetic_detections_with_duplicates(
    eval_runs: tuple[Path, list[dict]], backend: str, per_image: bool
) -> None:
    _, parts = eval_runs
    coco, cat_ids, predictions = synthetic_case()
    ev = CocoEvaluator(coco, cat_ids, backend=backend)
    ev.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = ev.evaluate()
    assert min(expected[:3]) > 0.01 and any(a["iscrowd"] for a in coco.dataset["annotations"])
    key = f"synthetic/{backend}/{per_image}"
    for part in parts:
        assert part[key]["stats"] == expected
    assert parts[0][key]["img_ids"] == sorted(predictions)
    assert np.array_equal(parts[0][key]["precision"], ev.coco_eval.eval["precision"])
    assert np.array_equal(parts[0][key]["recall"], ev.coco_eval.eval["recall"])


# ----------------------------------------------------------------------------------------------------------
# 2. DDP with batch b per process == one process with batch 2b
#
# Two checks per loss. Per step: from the same parameters (those of the single-process run before that
# step), the gradient averaged by DDP over the two processes is the single-process gradient of the whole
# batch, and the logged losses (averaged over ranks) are its losses. Trajectory: STEPS steps of the real
# training step (AdamW, gradient clipping) end at the single-process parameters.
#
# Model and images in float64 (TRAIN_DTYPE). A batch of 2b and two of b sum in different orders (conv and
# matmul blocking, SIMD width, threads), so the runs differ by rounding, and the gradient is discontinuous
# in the parameters: ReLU and max-pool kinks of the backbone, the Hungarian matching, the ranking losses'
# error-driven updates. A kink that rounding puts on the other side changes a few backbone gradients of
# about Adam's eps (1e-8), which AdamW turns into a parameter step of about 0.1 lr. In float32 that
# happens: a 1e-7 relative perturbation of the initial parameters (float32 rounding) moved this run's AP
# trajectory by 1.1e-4 in 7 of 40 draws (a ReLU input of 1e-10 changing sign at step 3), and the CE one by
# 4.5e-4 in 1 of 40, on any CPU. In float64 the rounding noise is 1e-16 and a kink is crossed with
# probability ~1e-9 per step. The criterion still computes in float32 (the trainer casts the outputs), but
# its discontinuities see float32 logits and boxes rounded from float64 values equal to 1e-16, hence the
# same bits, and the remaining float32 differences are continuous: its batch reductions (normalisers, the
# loss values of aLRP's self-balance) round differently, about 1 float32 ulp (6e-8) of a gradient.

PER_RANK_BATCH = 2
TRAIN_DTYPE = torch.float64
STEPS = 3
# (step, rank) whose images lose all their boxes: each rank has a step with no box at all.
EMPTY = {(0, 1), (1, 0)}
LOSS_CASES: dict[str, list[str]] = {
    "ce": ["loss.cls=ce"],
    "focal": ["loss.cls=focal"],
    "ap": ["loss.cls=ap", "loss.ap.group=image"],
    "rs": ["loss.cls=rs", "loss.rs.group=image"],
    "alrp": ["loss.cls=alrp", "loss.alrp.group=image", "loss.alrp.sb_period=2", "loss.alrp.sb_init=10"],
    # hybrid matching: a one-to-many plan (k = 2) on 12 extra queries, normalised by the positives of all ranks
    "hybrid": ["loss.cls=focal", "hybrid.num_queries=12", "hybrid.k=2", "hybrid.normalizer=positives"],
}
TRAJECTORY_CASES = tuple(LOSS_CASES)
# Control: cross-entropy normalised by the local weighted query count must NOT match.
CONTROL = "ce_local_normalizer"
CASES = {**LOSS_CASES, CONTROL: LOSS_CASES["ce"]}
LOGGED = ("loss", "loss_cls", "loss_bbox", "loss_giou", "loss_cls_0", "loss_bbox_0", "loss_giou_0")


def train_config(root: Path, case: str) -> Any:
    return load_config(SHAPES_YAML, tiny_overrides(root, root.parent / "unused", "model.dec_layers=2",
                                                   *CASES[case]))


def train_batches(root: Path, ranks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    """STEPS batches of the images of ``ranks`` (all ranks: the single-process batch of 2b). Global batch s
    holds training images [2b s, 2b (s+1)); rank r's share is [2b s + b r, 2b s + b (r+1)). Evaluation
    transforms (no random flip): the data are the same whatever the process."""
    data = CocoDetection(root / "train", root / "annotations" / "instances_train.json",
                         transforms=build_transforms("shapes", train=False), train=True)
    batches = []
    for step in range(STEPS):
        items = []
        for r in ranks:
            for j in range(PER_RANK_BATCH):
                image, target = data[step * WORLD * PER_RANK_BATCH + r * PER_RANK_BATCH + j]
                if (step, r) in EMPTY:
                    target = {**target, "boxes": target["boxes"][:0], "labels": target["labels"][:0],
                              "area": target["area"][:0], "iscrowd": target["iscrowd"][:0]}
                items.append((image, target))
        images, mask, targets = collate_batch(items)
        batches.append((images.to(TRAIN_DTYPE), mask, targets))
    return batches


def train_model(cfg: Any) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
    """The tiny DETR with its backbone's BatchNorm frozen (train-mode BatchNorm normalises with each
    process's own batch statistics, which no DDP setup makes equal to a larger batch's; DETR freezes it)."""
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(0)
    model = build_model(cfg, 3)
    model.backbone.body = freeze_batch_norm_2d(model.backbone.body)
    model.to(TRAIN_DTYPE)
    return model, build_criterion(cfg, 3), build_optimizer(cfg, model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def snapshot(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    return {k: (p.grad if grads else p).detach().clone() for k, p in unwrap(model).named_parameters()}


def train_step(cfg: Any, model: nn.Module, criterion: Any, optimizer: torch.optim.Optimizer,
               batch: tuple) -> dict[str, Any]:
    """One real training step (trainer.train_one_epoch on one batch); its losses averaged over processes, the
    (clipped) gradient it applied, and the aLRP self-balance state."""
    stats = trainer.train_one_epoch(model, criterion, [batch], optimizer, CPU, 0, cfg.optim.clip_max_norm,
                                    progress=False)
    out = {"stats": dist.all_reduce_mean(stats, CPU), "grads": snapshot(model, grads=True)}
    balance = getattr(criterion.cls_loss, "balance", None)
    if balance is not None:
        out["balance"] = balance.state_dict()
    return out


def reference_run(root: Path, case: str) -> dict[str, Any]:
    """One process, batch 2b: the parameters before each step, each step's record, the final parameters."""
    cfg = train_config(root, case)
    model, criterion, optimizer = train_model(cfg)
    before, steps = [], []
    for batch in train_batches(root, list(range(WORLD))):
        before.append(snapshot(model))
        steps.append(train_step(cfg, model, criterion, optimizer, batch))
    return {"before": before, "steps": steps, "final": snapshot(model)}


def _train_worker(rank: int, port: int, root: str, out: str) -> None:
    init_worker(rank, port)
    try:
        references = torch.load(Path(out) / "reference.pt", weights_only=False)
        batches = train_batches(Path(root), [rank])
        for step in range(STEPS):  # the premise: a process without any box at the steps in EMPTY
            assert (len(torch.cat([t["labels"] for t in batches[step][2]])) == 0) == ((step, rank) in EMPTY)
        results = {}
        for case in CASES:
            cfg = train_config(Path(root), case)
            with pytest.MonkeyPatch.context() as mp_:
                if case == CONTROL:
                    mp_.setattr(dist, "global_normalizer", lambda z, minimum=None: z.detach())
                final = None
                if case in TRAJECTORY_CASES or case == CONTROL:  # the real steps from the common start
                    model, criterion, optimizer = train_model(cfg)
                    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
                    for batch in batches:
                        train_step(cfg, ddp, criterion, optimizer, batch)
                    final = snapshot(model)
                # Per step: from the single-process parameters before each step (the control: the first).
                model, criterion, optimizer = train_model(cfg)
                ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
                steps = []
                count = 1 if case == CONTROL else STEPS
                for params, batch in zip(references[case]["before"][:count], batches[:count], strict=True):
                    model.load_state_dict(params, strict=False)
                    steps.append(train_step(cfg, ddp, criterion, optimizer, batch))
            results[case] = {"final": final, "steps": steps}
        torch.save(results, Path(out) / f"train{rank}.pt")
    finally:
        finish_worker()


@pytest.fixture(scope="module")
def train_runs(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    out = tmp_path_factory.mktemp("dist_train")
    references = {case: reference_run(shapes_root, case) for case in LOSS_CASES}
    torch.save({**references, CONTROL: references["ce"]}, out / "reference.pt")
    spawn(_train_worker, str(shapes_root), str(out))
    return references, [torch.load(out / f"train{r}.pt", weights_only=False) for r in range(WORLD)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def grad_mismatch(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest |difference| relative to the largest |gradient| of the same tensor plus 1e-4 of the largest
    of all (tensors whose gradient is ~0 compare at that absolute level)."""
    scale = max(float(g.abs().max()) for g in expected.values())
    return max(float((got[k] - g).abs().max()) / (float(g.abs().max()) + 1e-4 * scale) for k, g in expected.items())


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_two_processes_of_batch_b_take_the_steps_of_one_of_batch_2b(train_runs: tuple[dict, list[dict]],
                                                                   case: str) -> None:
    references, parts = train_runs
    expected = references[case]
    for part in parts:
        for step, (got, ref) in enumerate(zip(part[case]["steps"], expected["steps"], strict=True)):
            # From the same float64 parameters the discontinuities see the same bits (see above): what is left
            # is the criterion's float32 rounding, ~6e-8 of a gradient; a wrong normaliser gives ~1 (control)
            assert grad_mismatch(got["grads"], ref["grads"]) < 1e-5, (step, grad_mismatch(got["grads"], ref["grads"]))
            for key in LOGGED:  # the logged losses: each process's share, averaged over processes
                # float32 sums of at most a few hundred non-negative terms in another order: ~1e-7 relative
                assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5, abs=1e-7), (step, key)
            if "balance" in ref:  # float64 sums of those float32 loss values
                assert got["balance"] == pytest.approx(ref["balance"], rel=1e-6), step
    if "balance" in expected["steps"][-1]:
        assert expected["steps"][-1]["balance"]["weight"] != 10.0  # re-estimated after 2 steps
    for got, ref in zip(parts[0][case]["steps"], parts[1][case]["steps"], strict=True):
        assert max_diff(got["grads"], ref["grads"]) == 0.0  # DDP: one averaged gradient on every rank


@pytest.mark.parametrize("case", TRAJECTORY_CASES)
def test_two_processes_of_batch_b_train_to_the_parameters_of_one_of_batch_2b(
    train_runs: tuple[dict, list[dict]], case: str
) -> None:
    references, parts = train_runs
    expected = references[case]
    assert max_diff(expected["final"], expected["before"][0]) > 1e-3, "the steps must move the parameters"
    for part in parts:
        # Float64 runs (see above) whose gradients differ by the criterion's float32 rounding (~6e-8 relative,
        # continuous), through 3 AdamW steps of lr 1e-3: measured <= 3e-8, and perturbing the initial
        # parameters by 1e-9 relative (more than that rounding does) moved no trajectory by more than 8e-7 in
        # 240 draws. A crossed kink moves parameters by ~1e-4 (0.1 lr), a wrong normaliser by 6e-3 (control).
        assert max_diff(part[case]["final"], expected["final"]) < 1e-5
    assert max_diff(parts[0][case]["final"], parts[1][case]["final"]) == 0.0


def test_local_normalizer_breaks_the_equivalence(train_runs: tuple[dict, list[dict]]) -> None:
    """The control: with cross-entropy divided by each process's own weighted query count, the averaged
    gradient at a step where one process has no box is not the single-process one (the tests above can
    fail)."""
    references, parts = train_runs
    got, expected = parts[0][CONTROL], references["ce"]
    assert grad_mismatch(got["steps"][0]["grads"], expected["steps"][0]["grads"]) > 1e-2
    assert max_diff(got["final"], expected["final"]) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# 4. Resume in distributed mode


class Interrupted(RuntimeError):
    pass


def _resume_worker(rank: int, port: int, root: str, out: str) -> None:
    """Three runs in the same processes: uninterrupted; killed (on every rank) two iterations into epoch 1;
    resumed. After each, every rank records its aLRP self-balance state and a few draws of its RNG."""
    init_worker(rank, port)
    base = Path(out)
    record: dict[str, Any] = {}
    captured: dict[str, Any] = {}
    real_build, real_train = trainer.build_criterion, trainer.train_one_epoch

    def capture(cfg: Any, num_classes: int) -> Any:
        captured["criterion"] = real_build(cfg, num_classes)
        return captured["criterion"]

    def killed_in_epoch_1(*args: Any, **kwargs: Any) -> dict:
        if args[5] == 1:  # epoch
            real_train(*args[:8], 2, *args[9:], **kwargs)  # max_iters = 2
            raise Interrupted("simulated kill")
        return real_train(*args, **kwargs)

    def after(name: str) -> None:
        record[name] = {"balance": captured["criterion"].cls_loss.balance.state_dict(),
                        "torch": torch.rand(4).tolist(), "numpy": np.random.rand(2).tolist()}

    try:
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(trainer, "build_criterion", capture)
            overrides = json.loads((base / "overrides.json").read_text())
            trainer.run(load_config(SHAPES_YAML, overrides + [f"output_dir={base / 'whole'}"]), progress=False)
            after("whole")
            split = load_config(SHAPES_YAML, overrides + [f"output_dir={base / 'split'}"])
            with mp_.context() as inner:
                inner.setattr(trainer, "train_one_epoch", killed_in_epoch_1)
                try:
                    trainer.run(split, progress=False)
                    raise AssertionError("the run was not interrupted")
                except Interrupted:
                    pass
            record["interrupted_log"] = [r["epoch"] for r in read_log(base / "split")] if rank == 0 else None
            trainer.run(split, progress=False)
            after("resumed")
        (base / f"resume{rank}.json").write_text(json.dumps(record))
    finally:
        finish_worker()


@pytest.fixture(scope="module")
def resume_runs(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    base = tmp_path_factory.mktemp("dist_resume")
    # aLRP with a self-balance window of 3 iterations over 4-iteration epochs: a window is open at every
    # checkpoint. Batch 2 per process on the 16 training images; random flips from each rank's RNG.
    overrides = tiny_overrides(shapes_root, base / "unused", "data.batch_size=2", "data.eval_batch_size=3",
                               "loss.cls=alrp", "loss.alrp.sb_period=3", "loss.alrp.sb_init=10", epochs=2)
    (base / "overrides.json").write_text(json.dumps(overrides))
    spawn(_resume_worker, str(shapes_root), str(base))
    return base, [json.loads((base / f"resume{r}.json").read_text()) for r in range(WORLD)]


def test_interrupted_distributed_run_resumes_to_the_uninterrupted_state(
    resume_runs: tuple[Path, list[dict]],
) -> None:
    base, parts = resume_runs
    assert parts[0]["interrupted_log"] == [0]
    whole, split = read_log(base / "whole"), read_log(base / "split")
    assert [r["epoch"] for r in whole] == [r["epoch"] for r in split] == [0, 1]  # one line per epoch
    for mine, ref in zip(split, whole, strict=True):
        for key, value in ref.items():
            if key.startswith("train_") or key.startswith("test_loss"):
                assert mine[key] == pytest.approx(value, rel=0, abs=1e-6), (mine["epoch"], key)
        assert mine["test_coco_eval_bbox"] == pytest.approx(ref["test_coco_eval_bbox"], abs=1e-9)

    a, b = load_checkpoint(base / "split" / "checkpoint.pth"), load_checkpoint(base / "whole" / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 1
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    for index, slots in b["optimizer"]["state"].items():
        for name, value in slots.items():
            torch.testing.assert_close(a["optimizer"]["state"][index][name], value, rtol=0, atol=1e-6)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]
    assert a["criterion"] == b["criterion"]
    # One RNG state per rank, restored per rank: after the resumed run every rank draws what it would have
    # drawn after the uninterrupted run, and the ranks' streams differ.
    assert isinstance(a["rng"], list) and len(a["rng"]) == WORLD
    for part in parts:
        assert part["resumed"]["torch"] == part["whole"]["torch"]
        assert part["resumed"]["numpy"] == part["whole"]["numpy"]
    assert parts[0]["whole"]["torch"] != parts[1]["whole"]["torch"]


def test_alrp_self_balance_state_is_identical_on_both_ranks(resume_runs: tuple[Path, list[dict]]) -> None:
    _, parts = resume_runs
    for run_name in ("whole", "resumed"):
        first, second = parts[0][run_name]["balance"], parts[1][run_name]["balance"]
        assert first == second, run_name
    # 8 iterations, windows of 3: re-estimated twice, a window of 2 iterations open at the end.
    state = parts[0]["whole"]["balance"]
    assert state["weight"] != 10.0 and state["count"] == 2
    assert parts[0]["resumed"]["balance"] == pytest.approx(state, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# The command line under torchrun


def torchrun(*args: str, nproc: int = WORLD) -> str:
    """``torchrun --standalone --nproc_per_node=nproc tools/train.py ARGS``; its stdout (fails on an error)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tools" / "train.py"), "--config", str(SHAPES_YAML), "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def coco_lines(stdout: str) -> list[list[float]]:
    return [[float(v) for v in re.findall(r"=(\d+\.\d+|-1\.0000)", line)]
            for line in stdout.splitlines() if line.startswith("COCO bbox:")]


@pytest.mark.slow
def test_torchrun_trains_resumes_and_evaluates_with_tools_train(tiny, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 tools/train.py`` unchanged: one epoch, then the same command with two
    epochs resumes it; ``--eval-only --resume`` on 2 processes prints the numbers of 1 process, once."""
    out = tmp_path / "run"
    torchrun(*tiny("data.batch_size=2", out=out, epochs=1))
    assert [r["epoch"] for r in read_log(out)] == [0]
    state = load_checkpoint(out / "checkpoint.pth")
    assert isinstance(state["rng"], list) and len(state["rng"]) == WORLD
    assert "epoch 0 done" in torchrun(*tiny("data.batch_size=2", out=out, epochs=2))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and len(log[1]["test_coco_eval_bbox"]) == 12

    checkpoint = str(out / "checkpoint.pth")
    two = coco_lines(torchrun("--eval-only", "--resume", checkpoint, *tiny(out=tmp_path / "e2")))
    one = coco_lines(torchrun("--eval-only", "--resume", checkpoint, *tiny(out=tmp_path / "e1"), nproc=1))
    assert len(two) == len(one) == 1 and len(one[0]) == 12
    assert two == one
    assert (tmp_path / "e2" / "detections.json").exists()
