#!/usr/bin/env python
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
simply re-launched (train.py resumes from its checkpoint). Order: every variant of the first seed, then the
next seed.

Parallelism: --jobs N runs N at a time (without --gpus each gets OMP_NUM_THREADS = cores / N unless that
is set); --gpus 0,1,2,3 runs one per GPU (CUDA_VISIBLE_DEVICES); --torchrun N launches each run under
`python -m torch.distributed.run --standalone --nproc_per_node=N`
(with --gpus, each run gets N of the listed GPUs). A failing run is reported (return code and the tail of
its stdout.log) and the others go on. ROOT/ablation.json lists every variant with its status (finished /
failed / skipped), return code and directory. At the end ROOT/curves.png/.svg, ROOT/loss.png/.svg,
ROOT/table.md and ROOT/table.csv are written from the finished runs (detr_ot/plots.py). The exit code is 1
if any variant failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_ot.plots import last_progress, load_runs, write_report  # noqa: E402

DEFAULT_TRAIN_SCRIPT = str(Path(__file__).resolve().parent / "train.py")
TB_KEY = "log.tb_dir"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,\-]")
_MAX_NAME = 160


# --------------------------------------------------------------------------------------------- planning


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,...`` on commas outside brackets/braces/quotes (so ``[1,2],[3,4]`` gives two values)."""
    out, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["a=1,2", "b=x,y"]`` -> ``{"a": ["1", "2"], "b": ["x", "y"]}`` (order kept; values as typed)."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, vals = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--grid {spec!r}: expected key=v1,v2,...")
        if key == "seed":
            raise ValueError("--grid seed=...: use --seeds for seeds")
        if key in grid:
            raise ValueError(f"--grid: key {key!r} given twice")
        values = split_values(vals)
        if any(v == "" for v in values):
            raise ValueError(f"--grid {spec!r}: empty value")
        if len(set(values)) != len(values):
            raise ValueError(f"--grid {spec!r}: duplicate values")
        grid[key] = values
    return grid


def _split_pair(item: str, flag: str, spec: str, allow_empty: bool) -> tuple[str, str]:
    """``"key=value"`` -> ``(key, value)``, with an error naming the flag and its argument ``spec``."""
    key, sep, val = item.partition("=")
    key = key.strip()
    if not sep or not key or (val == "" and not allow_empty):
        raise ValueError(f"{flag} {spec!r}: expected key=value, got {item!r}")
    return key, val


def parse_variants(specs: list[str], grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """``["a=1 b=2", "a=3"]`` -> ``[{"a": "1", "b": "2"}, {"a": "3"}]``: each --variant is whitespace-separated
    ``key=value`` pairs (shell quoting honoured); no key may also be a grid axis or ``seed``."""
    variants: list[dict[str, str]] = []
    for spec in specs:
        ov: dict[str, str] = {}
        for item in shlex.split(spec):
            key, val = _split_pair(item, "--variant", spec, allow_empty=False)
            if key == "seed" or key in grid:
                raise ValueError(f"--variant {spec!r}: {key!r} is set by --seeds/--grid")
            if key in ov:
                raise ValueError(f"--variant {spec!r}: key {key!r} given twice")
            ov[key] = val
        if not ov:
            raise ValueError("--variant '': empty variant")
        if ov in variants:
            raise ValueError(f"--variant {spec!r}: given twice")
        variants.append(ov)
    return variants


def parse_extra(specs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> dict, checking the form."""
    extra: dict[str, str] = {}
    for spec in specs:
        key, val = _split_pair(spec, "--extra", spec, allow_empty=True)
        extra[key] = val
    return extra


def variant_name(overrides: dict[str, str], seed: int) -> str:
    """Filesystem-safe directory name ``k1=v1__k2=v2__seed=S`` (long names are shortened with a hash)."""
    parts = [f"{k}={v}" for k, v in overrides.items()] + [f"seed={seed}"]
    name = _UNSAFE.sub("-", "__".join(parts))
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 30]}...{digest}__seed={seed}"
    return name


@dataclass
class Job:
    """One (variant, seed) run."""

    name: str
    overrides: dict[str, str]
    seed: int
    dir: Path
    command: list[str] = field(default_factory=list)
    status: str = "pending"  # pending | running | finished | failed | skipped | interrupted
    returncode: int | None = None
    gpus: str | None = None
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None
    last_epoch: int | None = None
    last_ap: float | None = None
    note: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "overrides": self.overrides,
            "seed": self.seed,
            "status": self.status,
            "returncode": self.returncode,
            "dir": str(self.dir),
            "command": self.command,
            "gpus": self.gpus,
            "started": self.started,
            "ended": self.ended,
            "duration_s": self.duration_s,
            "last_epoch": self.last_epoch,
            "last_ap": self.last_ap,
            "note": self.note,
        }


def expand(
    grid: dict[str, list[str]], seeds: list[int], root: Path, variants: list[dict[str, str]] | None = None
) -> list[Job]:
    """Cartesian product of the --variant sets x grid values x seeds (seed-major: every variant of seed 0
    first)."""
    combos = [
        {**var, **dict(zip(grid, vals, strict=True))}
        for var in (variants or [{}])
        for vals in itertools.product(*grid.values())
    ]
    jobs = [
        Job(name=variant_name(ov, s), overrides=ov, seed=s, dir=root / variant_name(ov, s))
        for s in seeds
        for ov in combos
    ]
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"variant names collide after sanitising: {dupes}")
    return jobs


def build_command(job: Job, args: argparse.Namespace, extra: dict[str, str], root: Path) -> list[str]:
    """The training command of ``job`` (same interpreter; under torch.distributed.run with --torchrun)."""
    train = [args.train_script, "--config", args.config, "--output-dir", str(job.dir)]
    train += shlex.split(args.train_args)
    if args.device:
        train += ["--device", args.device]
    train += [f"{k}={v}" for k, v in extra.items()]
    train += [f"{k}={v}" for k, v in job.overrides.items()]
    train.append(f"seed={job.seed}")
    if not args.no_tb:
        train.append(f"{TB_KEY}={root / 'tb' / job.name}")
    if args.torchrun:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.torchrun}",
            *train,
        ]
    return [sys.executable, *train]


def make_slots(args: argparse.Namespace) -> list[str | None]:
    """Concurrent execution slots: a CUDA_VISIBLE_DEVICES string per slot with --gpus, else None x jobs."""
    if args.gpus is None:
        if args.jobs < 1:
            raise ValueError("--jobs must be >= 1")
        return [None] * args.jobs
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    per = args.torchrun or 1
    if not gpus or len(gpus) % per:
        raise ValueError(f"--gpus {args.gpus!r}: need a non-empty multiple of {per} GPU ids")
    return [",".join(gpus[i : i + per]) for i in range(0, len(gpus), per)]


# --------------------------------------------------------------------------------------------- running


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def tail(path: Path, n: int = 20) -> str:
    """Last ``n`` lines of a text file ('' if missing)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _total_epochs(run_dir: Path) -> int | None:
    """train.epochs from the run's resolved config.yaml, if readable."""
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return int(cfg["train"]["epochs"])
    except Exception:  # noqa: BLE001 - progress display only
        return None


def _describe(job: Job) -> str:
    epoch, ap = last_progress(job.dir)
    job.last_epoch, job.last_ap = epoch, ap
    if epoch is None:
        return f"{job.name} (starting)"
    total = _total_epochs(job.dir)
    done = f"{epoch + 1}/{total}" if total else f"{epoch + 1}"
    ap_s = f", AP {ap:.3f}" if ap is not None else ""
    return f"{job.name} (epochs done {done}{ap_s})"


class Ablation:
    """Schedules the jobs over the execution slots and keeps ROOT/ablation.json up to date."""

    def __init__(self, args: argparse.Namespace, jobs: list[Job], meta: dict[str, Any], root: Path) -> None:
        self.args, self.jobs, self.meta, self.root = args, jobs, meta, root
        self.summary_path = root / "ablation.json"

    def write_summary(self) -> None:
        _atomic_json(
            self.summary_path, {**self.meta, "updated": _now(), "variants": [j.record() for j in self.jobs]}
        )

    def _counts(self) -> str:
        c = {s: sum(j.status == s for j in self.jobs) for s in ("finished", "failed", "skipped", "pending")}
        done = c["finished"] + c["failed"] + c["skipped"]
        return (
            f"{done}/{len(self.jobs)} done (finished {c['finished']}, failed {c['failed']}, "
            f"skipped {c['skipped']}), {c['pending']} pending"
        )

    def _launch(self, job: Job, gpus: str | None) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        job.dir.mkdir(parents=True, exist_ok=True)
        ov_path = job.dir / "overrides.json"
        ov = {
            "name": job.name,
            "overrides": job.overrides,
            "seed": job.seed,
            "extra": self.meta["extra"],
            "config": self.args.config,
        }
        if ov_path.is_file():
            try:
                old = json.loads(ov_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
            if isinstance(old, dict) and any(old.get(k) != ov[k] for k in ("extra", "config")):
                print(f"[ablate] warning: {job.name}: resuming with a different config/--extra than before")
        _atomic_json(ov_path, ov)
        resuming = (job.dir / "log.txt").is_file() or (job.dir / "checkpoint.pth").is_file()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        elif "OMP_NUM_THREADS" not in os.environ:
            # N concurrent CPU runs share the cores instead of each spinning up one thread per core
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.args.jobs))
        log = (job.dir / "stdout.log").open("ab")
        log.write(
            f"=== {_now()} {'resuming' if resuming else 'launching'}: {' '.join(job.command)}\n".encode()
        )
        log.flush()
        proc = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        job.status, job.gpus, job.started, job.returncode = "running", gpus, _now(), None
        job.ended = job.duration_s = job.note = None
        where = f" on GPU {gpus}" if gpus is not None else ""
        print(f"[ablate] {'resume' if resuming else 'start'} {job.name}{where} (pid {proc.pid})", flush=True)
        return proc, log

    def _finish(self, job: Job, rc: int, t0: float) -> None:
        job.returncode, job.ended, job.duration_s = rc, _now(), round(time.monotonic() - t0, 3)
        job.last_epoch, job.last_ap = last_progress(job.dir)
        if rc == 0 and (job.dir / "finished.json").is_file():
            job.status = "finished"
            ap = f", AP {job.last_ap:.3f}" if job.last_ap is not None else ""
            print(f"[ablate] finished {job.name} in {job.duration_s:.0f}s{ap}", flush=True)
            return
        job.status = "failed"
        if rc == 0:
            job.note = "exited with code 0 but wrote no finished.json"
        print(f"[ablate] FAILED {job.name}: return code {rc}" + (f" ({job.note})" if job.note else ""))
        print(f"[ablate] --- tail of {job.dir / 'stdout.log'} ---")
        print(tail(job.dir / "stdout.log"))
        print("[ablate] ---", flush=True)

    def run(self) -> int:
        for job in self.jobs:
            if (job.dir / "finished.json").is_file():
                job.status = "skipped"
                job.last_epoch, job.last_ap = last_progress(job.dir)
                print(f"[ablate] skip {job.name} (finished.json present)")
        self.write_summary()
        slots = make_slots(self.args)
        pending = deque(j for j in self.jobs if j.status == "pending")
        running: dict[int, tuple[Job, subprocess.Popen[bytes], IO[bytes], float]] = {}
        last_report = time.monotonic()
        try:
            while pending or running:
                for slot, gpus in enumerate(slots):
                    if slot not in running and pending:
                        job = pending.popleft()
                        proc, log = self._launch(job, gpus)
                        running[slot] = (job, proc, log, time.monotonic())
                        self.write_summary()
                for slot, (job, proc, log, t0) in list(running.items()):
                    rc = proc.poll()
                    if rc is not None:
                        log.close()
                        del running[slot]
                        self._finish(job, rc, t0)
                        self.write_summary()
                if running and time.monotonic() - last_report >= self.args.progress_interval:
                    last_report = time.monotonic()
                    now = _dt.datetime.now().strftime("%H:%M:%S")
                    print(
                        f"[ablate {now}] {self._counts()}; running: "
                        + "; ".join(_describe(j) for j, *_ in running.values()),
                        flush=True,
                    )
                    self.write_summary()
                if running:
                    time.sleep(self.args.poll)
        except KeyboardInterrupt:
            print("[ablate] interrupted: stopping running variants (re-run the same command to resume)")
            for job, proc, log, _ in running.values():
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
                job.status, job.returncode, job.ended = "interrupted", proc.returncode, _now()
            self.write_summary()
            return 130
        self.write_summary()
        print(f"[ablate] {self._counts()}")
        return 1 if any(j.status == "failed" for j in self.jobs) else 0


def plot_results(jobs: list[Job], root: Path, args: argparse.Namespace) -> bool:
    """Curves and table from the finished/skipped runs; False (with a message) if nothing could be plotted."""
    dirs = [j.dir for j in jobs if j.status in ("finished", "skipped") and (j.dir / "log.txt").is_file()]
    if not dirs:
        print("[ablate] no finished run to plot")
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rep = write_report(
                runs=load_runs(dirs), out=root, x=args.x, panels=args.panels, band=args.band, reach=args.reach
            )
        except (OSError, ValueError) as e:
            rep = None
            print(f"[ablate] plotting failed: {e}")
    for w in caught:
        print(f"[ablate] warning: {w.message}")
    if rep is None:
        return False
    print(rep["markdown"], end="")
    print("[ablate] wrote " + ", ".join(str(f) for f in rep["files"]))
    return True


# --------------------------------------------------------------------------------------------- CLI


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
        make_slots(args)
    except ValueError as e:
        parser.error(str(e))
    if not Path(args.train_script).is_file():
        parser.error(f"--train-script {args.train_script}: no such file")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    root = Path(args.out)
    jobs = expand(grid, args.seeds, root, variants)
    for job in jobs:
        job.command = build_command(job, args, extra, root)
    if args.dry_run:
        for job in jobs:
            state = (
                "skip (finished)"
                if (job.dir / "finished.json").is_file()
                else (
                    "resume"
                    if (job.dir / "log.txt").is_file() or (job.dir / "checkpoint.pth").is_file()
                    else "run"
                )
            )
            print(f"[dry-run] {state}: {job.name}\n    {' '.join(job.command)}")
        print(
            f"[dry-run] {len(jobs)} runs ({len(jobs) // max(1, len(args.seeds))} variants x "
            f"{len(args.seeds)} seeds), slots: {make_slots(args)}"
        )
        return 0
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": args.config,
        "grid": grid,
        "variants": variants,
        "seeds": args.seeds,
        "extra": extra,
        "train_script": args.train_script,
        "launcher": {"jobs": args.jobs, "gpus": args.gpus, "torchrun": args.torchrun, "device": args.device},
        "tb_dir": None if args.no_tb else str(root / "tb"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "created": _now(),
    }
    abl = Ablation(args, jobs, meta, root)
    rc = abl.run()
    if rc == 130:
        return rc
    if not args.no_plots and any(j.status in ("finished", "skipped") for j in jobs):
        if not plot_results(jobs, root, args):
            rc = 1
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        print("[ablate] failed variants: " + ", ".join(f"{j.name} (rc {j.returncode})" for j in failed))
    print(f"[ablate] summary: {abl.summary_path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
