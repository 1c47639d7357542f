#!/usr/bin/env python
"""Benchmark of the COCO evaluation backends on a val2017-sized synthetic set, side by side in one run.

The set (detr_ot/evaluation/synthetic.py): 5000 images with COCO's 80 category ids, about 37k ground-truth
boxes (1% crowd, 1% images without annotations), 100 detections per image (one image in 50 has none).
Each backend evaluates the same detections through :class:`CocoEvaluator`; the table gives

* ``gt convert``: the one-off preparation of the evaluator's ground truth (its box-only copy loaded into the
  backend, and a trial evaluation of a few images; done once at start-up, not per evaluation epoch);
* ``evaluate``: one evaluation (result records, evaluate, accumulate, summarize), the figure that matters
  per evaluation epoch, and its speed-up over pycocotools measured in the same run;
* whether the 12 numbers and the precision array equal pycocotools' ("identical": both bit for bit;
  "equal to 1e-12": the last-bit rounding of a different summation order), with the largest absolute
  difference of each.

Every backend of ``BACKENDS`` runs by default (pycocotools, faster_coco_eval, hotcoco); pycocotools always
runs, first, as the reference of every ratio, so the ratios come from one run on the same machine state.

The exit status is 1 if a backend differs from pycocotools by more than 1e-12, or a distributed evaluation
from the single-process one at all.

``--nproc N`` adds the distributed evaluation on N CPU processes (gloo, spawned here): each process holds a
DistributedSampler-like shard (padded with repeated images) and calls ``evaluate_distributed`` with both
strategies; the time is that of the collective call on rank 0 (wall clock, and rank 0's CPU time, which a
machine shared with other jobs inflates less), and the numbers are checked against the single-process ones.

    python tools/bench_eval.py [--num-images 5000] [--dets 100] [--backends ...] [--nproc 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from detr_ot.evaluation.coco_evaluator import BACKENDS, CocoEvaluator  # noqa: E402
from detr_ot.evaluation.ground_truth import prepare_ground_truth  # noqa: E402
from detr_ot.evaluation.synthetic import coco_from_dataset, rows_to_predictions, synthetic_coco  # noqa: E402

TOLERANCE = 1e-12  # the tests' bound on a backend's difference to pycocotools


def verdict(row: dict[str, Any]) -> str:
    if row["identical"]:
        return "identical"
    return "equal to 1e-12" if row["equal"] else "DIFFERENT"


def make_set(num_images: int, dets: int, seed: int) -> tuple[Any, list[int], dict[int, dict], dict[str, int]]:
    """(GT COCO, label -> category id, predictions per image id, counts)."""
    dataset, detections = synthetic_coco(num_images=num_images, seed=seed, detections_per_image=dets)
    cat_ids = [c["id"] for c in dataset["categories"]]
    to_label = {c: i for i, c in enumerate(cat_ids)}
    predictions = {i: rows_to_predictions(rows, to_label) for i, rows in detections.items()}
    counts = {
        "images": len(dataset["images"]),
        "gt_boxes": len(dataset["annotations"]),
        "crowd_boxes": sum(a["iscrowd"] for a in dataset["annotations"]),
        "detections": int(sum(len(r) for r in detections.values())),
    }
    return coco_from_dataset(dataset), cat_ids, predictions, counts


def time_backend(coco: Any, cat_ids: list[int], predictions: dict[int, dict], backend: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    ground_truth = prepare_ground_truth(coco, backend)  # once per run, at start-up
    convert_s = time.perf_counter() - t0
    ev = CocoEvaluator(ground_truth, cat_ids, backend=backend)
    ev.update(predictions)
    t1, c1 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        stats = ev.evaluate()
    t2, c2 = time.perf_counter(), time.process_time()
    return {"backend": backend, "convert_s": convert_s, "evaluate_s": t2 - t1, "evaluate_cpu_s": c2 - c1,
            "stats": stats, "precision": np.asarray(ev.coco_eval.eval["precision"])}


# ----------------------------------------------------------------------------------------------------------
# distributed evaluation (optional)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        coco, cat_ids, predictions, _ = make_set(args.num_images, args.dets, args.seed)
        ids = sorted(predictions)
        padded = ids + ids[: (-len(ids)) % world]  # as DistributedSampler pads
        shard = padded[rank::world]
        results = []
        for backend in args.backends:
            for per_image in (True, False):
                ev = CocoEvaluator(prepare_ground_truth(coco, backend), cat_ids, backend=backend)
                ev.update({i: predictions[i] for i in shard})
                torch.distributed.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                with contextlib.redirect_stdout(io.StringIO()):
                    stats = ev.evaluate_distributed(per_image=per_image)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                results.append({"backend": backend, "per_image": per_image, "seconds": seconds, "cpu_s": cpu,
                                "stats": stats})
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dist.json")
        torch.multiprocessing.spawn(_dist_worker, args=(args.nproc, _free_port(), args, out), nprocs=args.nproc)
        return json.loads(Path(out).read_text())


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=5000, help="images (val2017: 5000)")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--nproc", type=int, default=0, help="also time distributed evaluation on N processes")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if "pycocotools" not in args.backends:
        args.backends = ["pycocotools", *args.backends]  # the reference of every ratio and comparison

    t0 = time.perf_counter()
    coco, cat_ids, predictions, counts = make_set(args.num_images, args.dets, args.seed)
    print(f"synthetic set: {counts['images']} images, {counts['gt_boxes']} boxes ({counts['crowd_boxes']} crowd), "
          f"{counts['detections']} detections ({time.perf_counter() - t0:.1f} s to generate)")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}\n")

    rows = {b: time_backend(coco, cat_ids, predictions, b) for b in args.backends}
    ref = rows["pycocotools"]
    print(f"{'backend':<18}{'gt convert s':>14}{'evaluate s':>12}{'(cpu s)':>9}{'speed-up':>10}{'(cpu)':>8}  "
          "12 numbers / precision array vs pycocotools")
    for backend, row in rows.items():
        d_stats = float(np.max(np.abs(np.subtract(row["stats"], ref["stats"]))))
        d_prec = float(np.max(np.abs(row["precision"] - ref["precision"])))
        row.update(speedup=ref["evaluate_s"] / row["evaluate_s"],
                   cpu_speedup=ref["evaluate_cpu_s"] / row["evaluate_cpu_s"],
                   max_stat_diff=d_stats, max_precision_diff=d_prec,
                   identical=row["stats"] == ref["stats"] and np.array_equal(row["precision"], ref["precision"]),
                   equal=max(d_stats, d_prec) <= TOLERANCE)
        print(f"{backend:<18}{row['convert_s']:>14.2f}{row['evaluate_s']:>12.2f}{row['evaluate_cpu_s']:>9.2f}"
              f"{row['speedup']:>9.1f}x{row['cpu_speedup']:>7.1f}x  "
              f"{verdict(row)} (max |diff| {d_stats:.1e} / {d_prec:.1e})")
    print("AP, AP50, AR100 (pycocotools): " + ", ".join(f"{ref['stats'][i]:.4f}" for i in (0, 1, 8)))

    report: dict[str, Any] = {"counts": counts, "threads": torch.get_num_threads(), "backends": [
        {k: v for k, v in row.items() if k != "precision"} for row in rows.values()]}
    if args.nproc > 1:
        print(f"\ndistributed evaluation, {args.nproc} CPU processes (gloo), shards padded as DistributedSampler:")
        print(f"{'backend':<18}{'strategy':<12}{'seconds':>9}{'rank-0 cpu s':>14}{'vs 1 process':>14}  12 numbers")
        dist_rows = run_distributed(args)
        for row in dist_rows:
            single = rows[row["backend"]]
            row["speedup_vs_single"] = single["evaluate_s"] / row["seconds"]
            row["identical"] = row["stats"] == single["stats"]
            row["equal"] = float(np.max(np.abs(np.subtract(row["stats"], single["stats"])))) <= TOLERANCE
            strategy = "per-image" if row["per_image"] else "gather"
            print(f"{row['backend']:<18}{strategy:<12}{row['seconds']:>9.2f}{row['cpu_s']:>14.2f}"
                  f"{row['speedup_vs_single']:>13.2f}x  "
                  f"{verdict(row)} (to the single-process numbers of the same backend)")
        report["distributed"] = {"nproc": args.nproc, "rows": dist_rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    ok = all(row["equal"] for row in rows.values()) and all(
        row["identical"] for row in report.get("distributed", {}).get("rows", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
