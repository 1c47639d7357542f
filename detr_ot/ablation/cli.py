"""Run a grid of training variants x seeds, each an ordinary tools/train.py run; then plot and tabulate them.

    python tools/ablate.py --config configs/shapes.yaml --out runs/matchers \\
        --grid matcher.name=hungarian,sinkhorn,gu --grid loss.cls=focal,rs --seeds 0 1 2 \\
        [--variant "k=v k2=v2" ...] [--jobs N | --gpus 0,1,...] [--torchrun N] [--extra key=value ...] \\
        [--device cpu|cuda] [--dry-run]

Every (grid combination, seed) is run as
    python tools/train.py --config C --output-dir ROOT/<name> --no-progress [--device D] EXTRA... GRID...
        seed=S log.tb_dir=ROOT/tb/<name>
A --variant (repeatable) is one set of overrides, for variants that differ in several keys at once (e.g.
`--variant "matcher.name=hungarian" --variant "matcher.name=gu matcher.gu.target=identity matcher.gu.scale=0.05"`);
the variants form one more grid axis, crossed with the --grid axes. GRID holds a run's grid and variant
overrides, with <name> = "k1=v1__k2=v2__seed=S" (characters outside [A-Za-z0-9._=+,-] replaced by '-'), so TensorBoard
pointed at ROOT/tb overlays all variants. ROOT/<name>/overrides.json records the variant before it starts
and ROOT/<name>/stdout.log receives its output. Runs with finished.json are skipped; interrupted runs are
re-launched first (train.py resumes from its checkpoint). Then, in order: every variant of the first seed, then the
next seed (--order seed, the default), or every seed of the first variant, then the next (--order variant).

Parallelism: --jobs N runs N at a time (without --gpus each gets OMP_NUM_THREADS = cores / N unless that
is set; a config's train.threads > 0, as in the shapes presets, takes precedence); --gpus 0,1,2,3 runs one
per GPU (CUDA_VISIBLE_DEVICES); --torchrun N launches each run under
`python -m torch.distributed.run --standalone --nproc_per_node=N`
(with --gpus, each run gets N of the listed GPUs). A failing run is reported (return code and the tail of
its stdout.log) and the others go on. ROOT/ablation.json lists every variant with its status (finished /
failed / skipped), return code and directory. At the end ROOT/curves.png/.svg, ROOT/loss.png/.svg,
ROOT/table.md and ROOT/table.csv are written from the finished runs (detr_ot/plots.py). The exit code is 1
if any variant failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_ot.ablation.plan import (
    ORDERS,
    TB_KEY,
    Launch,
    build_command,
    expand,
    make_slots,
    parse_extra,
    parse_grid,
    parse_variants,
)
from detr_ot.ablation.results import plot_results
from detr_ot.ablation.scheduler import Scheduler, has_started, now

# the training script of a checkout (the package sits beside tools/)
DEFAULT_TRAIN_SCRIPT = str(Path(__file__).resolve().parents[2] / "tools" / "train.py")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base config passed to train.py")
    p.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis (repeatable)"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'K=V K2=V2'",
        help="one set of overrides, quoted (repeatable; the variants form a grid axis)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="seed",
        help="launch order: seed-major (every variant of the first seed first; default) or variant-major "
        "(every seed of the first variant first)",
    )
    p.add_argument("--out", required=True, help="ablation root directory")
    par = p.add_mutually_exclusive_group()
    par.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    par.add_argument(
        "--gpus", default=None, help="comma-separated GPU ids; one run per GPU (group with --torchrun)"
    )
    p.add_argument(
        "--torchrun", type=int, default=0, metavar="N", help="run each variant under torchrun, N procs"
    )
    p.add_argument(
        "--extra",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides common to all variants (not part of names/labels)",
    )
    p.add_argument("--device", default=None, help="passed to train.py --device")
    p.add_argument(
        "--train-script", default=DEFAULT_TRAIN_SCRIPT, help="training script (default tools/train.py)"
    )
    p.add_argument(
        "--train-args",
        default="--no-progress",
        help="extra flags for the training script, one string (default: '--no-progress'; '' for none)",
    )
    p.add_argument("--no-tb", action="store_true", help=f"do not pass {TB_KEY}=ROOT/tb/<name>")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and commands; run and write nothing"
    )
    p.add_argument("--progress-interval", type=float, default=30.0, help="seconds between progress summaries")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--no-plots", action="store_true", help="skip the final curves/table")
    p.add_argument("--x", choices=["epoch", "hours"], default="epoch", help="plot x axis")
    p.add_argument("--panels", choices=["ap", "all"], default="ap", help="AP only, or AP/AP50/AP75/APs/m/l")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax", help="seed band")
    p.add_argument(
        "--reach", type=float, default=0.3, help="AP threshold for the table's 'epoch AP>=' column"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """The ablation CLI (``tools/ablate.py``): plan, run, plot; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        variants = parse_variants(args.variant, grid)
        extra = parse_extra(args.extra)
        variant_keys = {k for v in variants for k in v}
        clash = sorted(set(extra) & (set(grid) | variant_keys | {"seed", TB_KEY}))
        if clash:
            raise ValueError(f"--extra sets {clash}, which the grid/variants/seeds/TensorBoard dir already set")
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds has duplicates: {args.seeds}")
        if args.torchrun < 0:
            raise ValueError("--torchrun must be >= 1")
        slots = make_slots(args.jobs, args.gpus, args.torchrun)
    except ValueError as e:
        parser.error(str(e))
    if not Path(args.train_script).is_file():
        parser.error(f"--train-script {args.train_script}: no such file")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    root = Path(args.out)
    jobs = expand(grid, args.seeds, root, variants, order=args.order)
    launch = Launch(args.train_script, args.config, args.train_args, args.device, args.torchrun, not args.no_tb)
    for job in jobs:
        job.command = build_command(job, launch, extra, root)
    if args.dry_run:
        for job in jobs:
            finished = (job.dir / "finished.json").is_file()
            state = "skip (finished)" if finished else ("resume" if has_started(job.dir) else "run")
            print(f"[dry-run] {state}: {job.name}\n    {' '.join(job.command)}")
        print(
            f"[dry-run] {len(jobs)} runs ({len(jobs) // max(1, len(args.seeds))} variants x "
            f"{len(args.seeds)} seeds), slots: {slots}"
        )
        return 0
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": args.config,
        "grid": grid,
        "variants": variants,
        "seeds": args.seeds,
        "order": args.order,
        "extra": extra,
        "train_script": args.train_script,
        "launcher": {"jobs": args.jobs, "gpus": args.gpus, "torchrun": args.torchrun, "device": args.device},
        "tb_dir": None if args.no_tb else str(root / "tb"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "created": now(),
    }
    scheduler = Scheduler(jobs, slots, meta, root, progress_interval=args.progress_interval, poll=args.poll)
    rc = scheduler.run()
    if rc in (130, 143):  # stopped by SIGINT / SIGTERM: no plots of a partial state
        return rc
    if not args.no_plots and any(j.status in ("finished", "skipped") for j in jobs):
        if not plot_results(jobs, root, x=args.x, panels=args.panels, band=args.band, reach=args.reach):
            rc = 1
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        print("[ablate] failed variants: " + ", ".join(f"{j.name} (rc {j.returncode})" for j in failed))
    print(f"[ablate] summary: {scheduler.summary_path}")
    return rc
