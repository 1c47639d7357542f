#!/usr/bin/env python
"""Train or evaluate a DETR.

    python tools/train.py [--config configs/shapes_deformable.yaml] [--output-dir D] [--resume P] [--eval-only]
                          [--device cpu|cuda] [key=value ...]

``key=value`` overrides any config field, e.g. ``matcher.name=sinkhorn optim.lr=2e-4``. Works unchanged
under ``torchrun --nproc_per_node=N``. Re-running on the same output directory resumes it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# OpenMP worker threads that spin while waiting make every step many times slower as soon as another process
# (a data-loader worker, a second run) shares the cores; must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from detr_ot import distributed as dist  # noqa: E402
from detr_ot.config import ConfigError, load_config  # noqa: E402
from detr_ot.data.coco import AnnotationError  # noqa: E402
from detr_ot.engine.trainer import NonFiniteLossError, run  # noqa: E402
from detr_ot.matching import NonFiniteCostError  # noqa: E402
from detr_ot.models import BackboneWeightsError  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "shapes_deformable.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/shapes_deformable.yaml)"
    )
    parser.add_argument("--output-dir", help="where logs, TensorBoard and checkpoints go (config: output_dir)")
    parser.add_argument("--resume", help="checkpoint to resume from (default: <output_dir>/checkpoint.pth if any)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the (resumed) model and exit")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="config: device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.device:
        overrides.append(f"device={args.device}")
    try:
        cfg = load_config(args.config, overrides)
        result = run(cfg, resume=args.resume, eval_only=args.eval_only, progress=not args.no_progress)
        main_process = dist.is_main()
    except (ConfigError, AnnotationError, FileNotFoundError, NonFiniteLossError, NonFiniteCostError,
            BackboneWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    if args.eval_only and main_process:  # once, not once per process
        names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
        stats = result["test_coco_eval_bbox"]
        print("COCO bbox: " + "  ".join(f"{n}={v:.4f}" for n, v in zip(names, stats, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
