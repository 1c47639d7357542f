"""Planning an ablation: the grid, variant and ``--extra`` specs, the (variant, seed) jobs, their directory
names, their training commands and the execution slots they share."""

from __future__ import annotations

import hashlib
import itertools
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TB_KEY = "log.tb_dir"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,\-]")
_MAX_NAME = 160


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


ORDERS = ("seed", "variant")  # launch orders of expand(): seed-major, variant-major


def expand(
    grid: dict[str, list[str]],
    seeds: list[int],
    root: Path,
    variants: list[dict[str, str]] | None = None,
    order: str = "seed",
) -> list[Job]:
    """Cartesian product of the --variant sets x grid values x seeds, in launch order.

    ``order="seed"`` (seed-major): every variant of the first seed, then the next seed, so a cut-short ablation
    holds one complete comparison. ``order="variant"`` (variant-major): every seed of the first variant, then
    the next, so finished rows have all their seeds (min-max bands) before later rows start."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    combos = [
        {**var, **dict(zip(grid, vals, strict=True))}
        for var in (variants or [{}])
        for vals in itertools.product(*grid.values())
    ]
    pairs = (
        [(ov, s) for s in seeds for ov in combos] if order == "seed" else [(ov, s) for ov in combos for s in seeds]
    )
    jobs = [Job(name=variant_name(ov, s), overrides=ov, seed=s, dir=root / variant_name(ov, s)) for ov, s in pairs]
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"variant names collide after sanitising: {dupes}")
    return jobs


@dataclass(frozen=True)
class Launch:
    """How every run is launched: the training script with the base config, the script's own flags (one
    shell string), ``--device``, ``torchrun`` processes per run (0: a plain process) and whether each run
    logs TensorBoard under ``ROOT/tb/<name>``."""

    train_script: str
    config: str
    train_args: str = "--no-progress"
    device: str | None = None
    torchrun: int = 0
    tensorboard: bool = True


def build_command(job: Job, launch: Launch, extra: dict[str, str], root: Path) -> list[str]:
    """The training command of ``job`` (same interpreter; under torch.distributed.run with torchrun)."""
    train = [launch.train_script, "--config", launch.config, "--output-dir", str(job.dir)]
    train += shlex.split(launch.train_args)
    if launch.device:
        train += ["--device", launch.device]
    train += [f"{k}={v}" for k, v in extra.items()]
    train += [f"{k}={v}" for k, v in job.overrides.items()]
    train.append(f"seed={job.seed}")
    if launch.tensorboard:
        train.append(f"{TB_KEY}={root / 'tb' / job.name}")
    if launch.torchrun:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={launch.torchrun}",
            *train,
        ]
    return [sys.executable, *train]


def make_slots(jobs: int, gpus: str | None, torchrun: int = 0) -> list[str | None]:
    """Concurrent execution slots: a CUDA_VISIBLE_DEVICES string per slot when ``gpus`` (comma-separated ids,
    ``torchrun`` of them per slot) is given, else ``None`` x ``jobs``."""
    if gpus is None:
        if jobs < 1:
            raise ValueError("--jobs must be >= 1")
        return [None] * jobs
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    per = torchrun or 1
    if not ids or len(ids) % per:
        raise ValueError(f"--gpus {gpus!r}: need a non-empty multiple of {per} GPU ids")
    return [",".join(ids[i : i + per]) for i in range(0, len(ids), per)]
