#!/usr/bin/env python
"""Training throughput (images/s) of the tiny and R50 presets, with 1 and N processes, in one run.

Each measurement is a fresh ``torchrun --standalone --nproc_per_node=N`` launch of this script in worker
mode, which runs the engine's own training step (``trainer.train_one_epoch``: DDP, DistributedSampler,
global box-count normalisation, gradient clipping) for ``--warmup`` iterations, then times ``--iters``
more. Images/s counts the images of all processes (``N`` x per-process batch x iterations), so the batch
per process is fixed and the total batch grows with ``N``, as in data-parallel training. Each ratio is
against the 1-process figure of the same preset, device and AMP setting, measured in the same run.

Presets: ``tiny`` is configs/shapes.yaml (tiny CNN, d=128, 1+3 layers, 20 queries, 96..128 px shapes
images, batch 8 per process); ``r50`` is configs/detr_r50_coco.yaml (DETR-R50: ResNet-50 with frozen
BatchNorm, 6+6 layers, d=256, 100 queries, batch 2 per process) with ``model.pretrained=false`` (no
download) on synthetic shapes images of ``--r50-size`` px (default 800 on a GPU, like COCO's shorter side;
256 on CPU, where 800 px takes minutes per step). ``tiny_deform`` (configs/shapes_deformable.yaml) and
``r50_deform`` (configs/deformable_r50_coco.yaml: two-stage Deformable DETR, 4 levels, 300 queries) are the
Deformable DETR family on the same images as ``tiny`` and ``r50``. Data come from the built-in shapes
generator, written once under ``--data-dir``.

CPU runs use gloo and ``--threads`` torch threads per process (default 1). On CUDA every preset also runs
with and without AMP on 1 GPU, and on all GPUs when there are several.

    python tools/bench_train.py [--presets tiny r50] [--nprocs 1 2] [--iters 10] [--warmup 3] [--json f]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PRESETS = {
    "tiny": ROOT / "configs" / "shapes.yaml",
    "r50": ROOT / "configs" / "detr_r50_coco.yaml",
    "tiny_deform": ROOT / "configs" / "shapes_deformable.yaml",
    "r50_deform": ROOT / "configs" / "deformable_r50_coco.yaml",
}


def is_tiny(preset: str) -> bool:
    """Tiny presets run on the small shapes images, the others on ``--r50-size`` px images."""
    return preset.startswith("tiny")


def preset_overrides(args: argparse.Namespace, preset: str, device: str, images: int) -> list[str]:
    """Config overrides of ``preset``: shapes data under ``--data-dir`` with ``images`` training images."""
    if is_tiny(preset):
        batch, lo, hi, objects = args.tiny_batch, 96, 128, 5
        extra: list[str] = []
    else:
        size = args.r50_size or (800 if device == "cuda" else 256)
        batch, lo, hi, objects = args.r50_batch, int(size * 0.75), size, 8
        extra = ["model.pretrained=false", "data.dataset=shapes", "data.transforms=shapes",
                 "data.train_split=train", "data.val_split=val"]
    root = Path(args.data_dir) / f"{'tiny' if is_tiny(preset) else 'r50'}_{lo}_{hi}_{images}"  # shared by models
    return [*extra, f"data.root={root}", f"data.batch_size={batch}", f"data.num_workers={args.num_workers}",
            f"data.shapes.num_train={images}", "data.shapes.num_val=1", "data.shapes.seed=0",
            f"data.shapes.min_size={lo}", f"data.shapes.max_size={hi}", f"data.shapes.max_objects={objects}",
            f"device={device}"]


# ----------------------------------------------------------------------------------------------------------
# worker: one measurement inside torchrun


def worker(args: argparse.Namespace) -> None:
    from torch import nn
    from torch.utils.data import DistributedSampler

    from detr_ot import distributed as dist
    from detr_ot.build import build_criterion, build_model, build_optimizer
    from detr_ot.config import load_config
    from detr_ot.data.build import build_dataset, build_loader
    from detr_ot.engine.trainer import seed_everything, train_one_epoch

    torch.set_num_threads(args.threads)
    overrides = json.loads(args.overrides)
    cfg = load_config(PRESETS[args.preset], [*overrides, f"train.amp={str(args.amp).lower()}"])
    device = dist.init_from_env(cfg.device)
    seed_everything(0)
    dataset = build_dataset(cfg.data, "train")  # generated beforehand by the driver
    model = build_model(cfg, dataset.num_classes).to(device)
    criterion = build_criterion(cfg, dataset.num_classes).to(device)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    if dist.is_dist():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=0)
    loader = build_loader(dataset, cfg.data.batch_size, True, cfg.data.num_workers, sampler=sampler)

    def steps(count: int) -> float:
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_one_epoch(model, criterion, loader, optimizer, device, 0, cfg.optim.clip_max_norm, scaler,
                        max_iters=count, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        return time.perf_counter() - t0

    steps(args.warmup)
    seconds = steps(args.iters)
    images = args.iters * cfg.data.batch_size * dist.world_size()
    if dist.is_main():
        Path(args.out).write_text(json.dumps({
            "images_per_s": images / seconds, "seconds": seconds, "images": images,
            "batch_per_process": cfg.data.batch_size, "world": dist.world_size(), "device": device.type,
        }))
    dist.shutdown()


# ----------------------------------------------------------------------------------------------------------
# driver


def measure(args: argparse.Namespace, preset: str, device: str, nproc: int, amp: bool) -> dict[str, Any]:
    images = (args.warmup + args.iters) * max(args.nprocs + [nproc]) * batch_of(args, preset)
    overrides = preset_overrides(args, preset, device, images)
    prepare_data(preset, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", "--preset", preset, "--overrides", json.dumps(overrides),
               "--out", str(out), "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--threads", str(args.threads)] + (["--amp"] if amp else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{preset} on {nproc} x {device} failed:\n{done.stderr[-4000:]}")
        return {"preset": preset, "device": device, "amp": amp, "nproc": nproc, **json.loads(out.read_text())}


def batch_of(args: argparse.Namespace, preset: str) -> int:
    return args.tiny_batch if is_tiny(preset) else args.r50_batch


def prepare_data(preset: str, overrides: list[str]) -> None:
    """Generate the shapes data once, here, before any worker starts."""
    from detr_ot.config import load_config
    from detr_ot.data.build import build_dataset

    build_dataset(load_config(PRESETS[preset], overrides).data, "train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny_deform", "r50", "r50_deform"],
                        choices=list(PRESETS))
    parser.add_argument("--nprocs", nargs="+", type=int, default=[1, 2], help="CPU process counts")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--tiny-batch", type=int, default=8, help="tiny: batch per process")
    parser.add_argument("--r50-batch", type=int, default=2, help="r50: batch per process")
    parser.add_argument("--r50-size", type=int, default=0, help="r50 image side (0: 800 on CUDA, 256 on CPU)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU runs")
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA runs")
    parser.add_argument("--data-dir", default=str(ROOT / "datasets" / "bench"), help="where the images go")
    parser.add_argument("--json", help="write the figures to this file")
    # worker mode (inside torchrun)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    plan: list[tuple[str, str, int, bool]] = []
    for preset in args.presets:
        if not args.no_cpu:
            plan += [(preset, "cpu", n, False) for n in sorted(set(args.nprocs))]
        if torch.cuda.is_available() and not args.no_gpu:
            gpus = sorted({1, torch.cuda.device_count()})
            plan += [(preset, "cuda", n, amp) for amp in (False, True) for n in gpus]
    print(f"cpu count {os.cpu_count()}, {args.threads} torch thread(s) per CPU process, "
          f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"{'preset':<12}{'device':<7}{'amp':<5}{'procs':>6}{'batch/proc':>11}{'total batch':>12}"
          f"{'images/s':>10}{'vs 1 proc':>11}")
    rows: list[dict[str, Any]] = []
    for preset, device, nproc, amp in plan:
        row = measure(args, preset, device, nproc, amp)
        base = next((r for r in rows if (r["preset"], r["device"], r["amp"], r["nproc"]) == (preset, device, amp, 1)),
                    row if nproc == 1 else None)
        row["ratio_vs_1_process"] = row["images_per_s"] / base["images_per_s"] if base else None
        rows.append(row)
        ratio = f"{row['ratio_vs_1_process']:.2f}x" if base else "-"
        print(f"{preset:<12}{device:<7}{'on' if amp else 'off':<5}{nproc:>6}{row['batch_per_process']:>11}"
              f"{nproc * row['batch_per_process']:>12}{row['images_per_s']:>10.2f}{ratio:>11}", flush=True)
    if not torch.cuda.is_available():
        print("(no CUDA device: GPU figures, with and without AMP, skipped)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
