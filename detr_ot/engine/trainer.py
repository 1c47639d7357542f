"""Training and evaluation loops, and the epoch driver with automatic resume."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from detr_ot import distributed as dist
from detr_ot.build import build_criterion, build_model, build_optimizer, build_postprocess, build_scheduler
from detr_ot.config import Config, ConfigError, dump_config, to_dict
from detr_ot.data.build import build_dataset, build_loader, check_same_categories, seed_loader_epoch
from detr_ot.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from detr_ot.engine.logger import RunLogger
from detr_ot.evaluation.coco_evaluator import DEFAULT_BACKEND, CocoEvaluator, check_backend
from detr_ot.evaluation.ground_truth import EvalGroundTruth, prepare_ground_truth
from detr_ot.losses.criterion import SetCriterion
from detr_ot.models.postprocess import PostProcess


class NonFiniteLossError(FloatingPointError):
    """The training loss went NaN/inf; the message names the loss term(s), the epoch and the iteration."""


def seed_everything(seed: int) -> None:
    """Seed every random source; each process gets its own stream (``seed + rank``)."""
    s = seed + dist.rank()
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _to_device(images: torch.Tensor, mask: torch.Tensor, targets: list[dict], device: torch.device):  # noqa: ANN202
    images = images.to(device, non_blocking=True)
    mask = mask.to(device, non_blocking=True)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, mask, targets


def _check_finite(losses: dict[str, torch.Tensor], epoch: int, iteration: int) -> None:
    if bool(torch.isfinite(losses["loss"])):
        return
    bad = [k for k, v in losses.items() if k != "loss" and not bool(torch.isfinite(v))]
    raise NonFiniteLossError(
        f"non-finite training loss at epoch {epoch}, iteration {iteration}: term(s) {bad or ['loss']} "
        f"= {[float(losses[k].detach()) for k in bad]}. The run stopped; the last good checkpoint is kept."
    )


class Averager:
    """Running sums of detached scalars, synchronised to the host once per epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    clip_max_norm: float,
    scaler: torch.amp.GradScaler | None = None,
    max_iters: int = 0,
    progress: bool = True,
    warmup_iters: int = 0,
    base_lrs: list[float] | None = None,
    global_iter: int = 0,
) -> dict[str, float]:
    model.train()
    criterion.train()
    stats = Averager()
    total = len(loader) if max_iters <= 0 else min(max_iters, len(loader))  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=f"epoch {epoch}", disable=not (progress and dist.is_main()), dynamic_ncols=True)
    use_amp = scaler is not None
    for it, (images, mask, targets) in enumerate(loader):
        if it >= total:
            break
        if warmup_iters and base_lrs is not None and global_iter + it < warmup_iters:
            frac = (global_iter + it + 1) / warmup_iters
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * frac
        images, mask, targets = _to_device(images, mask, targets, device)
        with torch.autocast(device.type, enabled=use_amp and device.type == "cuda"):
            outputs = model(images, mask)
        losses = criterion(_float_outputs(outputs), targets)
        _check_finite(losses, epoch, it)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
        else:
            losses["loss"].backward()
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        stats.add(losses)
        if it % 10 == 0:
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        bar.update(1)
    bar.close()
    means = stats.means()
    means["lr"] = optimizer.param_groups[0]["lr"]
    return means


def _float_outputs(outputs: Any) -> Any:
    """Losses are computed in fp32 even under autocast, on every nested layer of the outputs (aux_outputs,
    two-stage enc_outputs, ...)."""
    if isinstance(outputs, dict):
        return {k: _float_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, list | tuple):
        return [_float_outputs(v) for v in outputs]
    return outputs.float() if torch.is_tensor(outputs) and outputs.is_floating_point() else outputs


@torch.no_grad()
def evaluate(
    model: nn.Module,
    criterion: SetCriterion | None,
    postprocess: PostProcess,
    loader: Iterable,
    dataset: Any,
    device: torch.device,
    backend: str = DEFAULT_BACKEND,
    progress: bool = True,
    per_image: bool | None = None,
    ground_truth: EvalGroundTruth | None = None,
) -> tuple[dict[str, float], list[float], CocoEvaluator]:
    """Inference over ``loader`` (a shard of the dataset per process), the test losses, and COCO bbox
    evaluation merged over processes (each image counted once, see ``CocoEvaluator.evaluate_distributed``,
    whose strategy ``per_image`` selects; None: the backend's default). ``ground_truth``: the evaluator's
    ground truth prepared at start-up (None: prepared now from ``dataset.coco``).
    Returns (mean losses, 12 stats on every rank, evaluator: on rank 0 it holds every image's detections)."""
    model.eval()
    if criterion is not None:
        criterion.eval()
    evaluator = CocoEvaluator(dataset.coco if ground_truth is None else ground_truth, dataset.label_to_cat_id,
                              backend=backend, source=getattr(dataset, "ann_file", None))
    stats = Averager()
    for images, mask, targets in tqdm(loader, desc="eval", disable=not (progress and dist.is_main()), leave=False):
        images, mask, targets = _to_device(images, mask, targets, device)
        outputs = _float_outputs(model(images, mask))
        if criterion is not None:
            stats.add(criterion(outputs, targets))
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocess(outputs, orig_sizes)
        evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results, strict=True)})
    coco_stats = evaluator.evaluate_distributed(per_image=per_image)
    return dist.all_reduce_mean(stats.means(), device), coco_stats, evaluator


def _restore_rng(saved: dict | list[dict]) -> None:
    """Restore this rank's RNG streams: a distributed checkpoint holds one state per rank. A rank that the
    checkpoint has no state for (resumed on more processes) keeps its fresh ``seed + rank`` streams rather
    than sharing another rank's."""
    if isinstance(saved, dict):
        set_rng_state(saved)
    elif dist.rank() < len(saved):
        set_rng_state(saved[dist.rank()])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def run(cfg: Config, resume: str | None = None, eval_only: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or only evaluate) as configured. Resumes from ``resume`` or ``<output_dir>/checkpoint.pth``."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = dist.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoint.pth"
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        print("resolved config:\n" + dump_config(cfg), flush=True)

    if not dist.is_main():  # rank 0 first: a shapes dataset is generated on first use, by one process
        dist.barrier()
    train_set = None if eval_only else build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    if train_set is not None:
        check_same_categories(train_set, val_set)
    if dist.is_main():
        dist.barrier()
    num_classes = val_set.num_classes
    model = build_model(cfg, num_classes).to(device)
    criterion = build_criterion(cfg, num_classes).to(device)
    postprocess = build_postprocess(cfg)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp and device.type == "cuda" else None

    start_epoch = 0
    elapsed = 0.0
    source = Path(resume) if resume else (ckpt_path if ckpt_path.exists() else None)
    if source is not None:
        state = load_checkpoint(source, map_location=device)
        _unwrap(model).load_state_dict(state["model"])
        if not eval_only:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if state.get("criterion"):
                criterion.load_state_dict(state["criterion"])
            _restore_rng(state["rng"])
        start_epoch = state["epoch"] + 1
        elapsed = state.get("elapsed", 0.0)
        if dist.is_main():
            print(f"resumed from {source} (epoch {state['epoch']} done)", flush=True)

    if not eval_only and start_epoch >= cfg.train.epochs:
        if dist.is_main():
            print(f"{out}: all {cfg.train.epochs} epochs are done; nothing to train", flush=True)
            if not (out / "finished.json").exists():
                (out / "finished.json").write_text(json.dumps({"epochs": cfg.train.epochs}) + "\n")
        return {"epoch": start_epoch - 1}

    ddp_model = model
    if dist.is_dist() and not eval_only:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )

    world, rank = dist.world_size(), dist.rank()
    try:  # a bad backend fails now, not after the first training epoch
        check_backend(cfg.train.eval_backend)
    except (ValueError, ImportError) as err:
        raise ConfigError(f"train.eval_backend: {err}") from err
    # The evaluator's ground truth too: a file the backend rejects fails now, naming the file and the record.
    eval_gt = prepare_ground_truth(val_set.coco, cfg.train.eval_backend, source=getattr(val_set, "ann_file", None))
    val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    val_loader = build_loader(val_set, cfg.data.eval_batch_size, False, cfg.data.num_workers, sampler=val_sampler)

    if eval_only:
        test_stats, coco_stats, evaluator = evaluate(model, criterion, postprocess, val_loader, val_set, device,
                                                     cfg.train.eval_backend, progress=progress, ground_truth=eval_gt)
        if dist.is_main():
            evaluator.dump(out / "detections.json")
        return {"test_coco_eval_bbox": coco_stats, **{f"test_{k}": v for k, v in test_stats.items()}}

    logger = RunLogger(out, cfg.log.tb_dir, cfg.log.tensorboard)
    logger.truncate_from(start_epoch)
    assert train_set is not None
    train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    train_loader = build_loader(train_set, cfg.data.batch_size, True, cfg.data.num_workers, sampler=train_sampler)
    base_lrs = [g["initial_lr"] if "initial_lr" in g else g["lr"] for g in optimizer.param_groups]
    iters_per_epoch = len(train_loader) if cfg.train.max_iters_per_epoch <= 0 else min(
        len(train_loader), cfg.train.max_iters_per_epoch)
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        train_sampler.set_epoch(epoch)
        seed_loader_epoch(train_loader, cfg.seed + dist.rank(), epoch)
        criterion.matcher.set_epoch(epoch, cfg.train.epochs)
        train_stats = train_one_epoch(
            ddp_model, criterion, train_loader, optimizer, device, epoch, cfg.optim.clip_max_norm, scaler,
            cfg.train.max_iters_per_epoch, progress, cfg.optim.warmup_iters, base_lrs, epoch * iters_per_epoch,
        )
        scheduler.step()
        train_stats = dist.all_reduce_mean(train_stats, device)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}
        last = epoch == cfg.train.epochs - 1
        if last or (epoch + 1) % max(cfg.train.eval_interval, 1) == 0:
            test_stats, coco_stats, _ = evaluate(model, criterion, postprocess, val_loader, val_set, device,
                                                 cfg.train.eval_backend, progress=progress, ground_truth=eval_gt)
            record.update({f"test_{k}": v for k, v in test_stats.items()})
            record["test_coco_eval_bbox"] = coco_stats
        epoch_time = time.time() - t0
        elapsed += epoch_time
        record.update({"epoch_time": epoch_time, "elapsed": elapsed, "n_parameters": n_parameters})
        logger.log_epoch(record)
        rngs = dist.all_gather_objects(rng_state())  # every rank's own streams, restored per rank on resume
        criterion.synchronize_state()  # e.g. aLRP's self-balance window: rank 0's copy must hold for all
        if dist.is_main():
            if "test_coco_eval_bbox" in record:
                ap = record["test_coco_eval_bbox"]
                print(f"epoch {epoch}: loss {train_stats['loss']:.4f}  AP {ap[0]:.4f}  AP50 {ap[1]:.4f}  "
                      f"({epoch_time:.0f} s)", flush=True)
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "criterion": criterion.state_dict(),
                "epoch": epoch,
                "elapsed": elapsed,
                "config": to_dict(cfg),
                "rng": rngs if dist.is_dist() else rngs[0],
            })
        dist.barrier()
    logger.close()
    if dist.is_main():
        (out / "finished.json").write_text(json.dumps({"epochs": cfg.train.epochs, "last": record}) + "\n")
    return record
