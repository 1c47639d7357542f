"""Read training runs, aggregate them over seeds and draw / tabulate their COCO AP curves.

A *run* is a directory written by ``tools/train.py``: ``log.txt`` (one JSON object per epoch),
``config.yaml`` and, for runs launched by ``tools/ablate.py``, ``overrides.json`` (``{"overrides": {key:
value}, "seed": int, ...}``). Runs that share the same overrides except the seed form a *variant*; a variant's
curve is the mean over its seeds on the epochs every seed has evaluated, with a band that is either the
min-max envelope or mean +- sample standard deviation (ddof=1; zero width for a single seed).

Metric indices follow pycocotools' ``COCOeval.stats`` order (Lin et al., "Microsoft COCO", 2014; pycocotools
``cocoeval.py`` ``summarize``): 0 AP@[.50:.95], 1 AP@.50, 2 AP@.75, 3/4/5 AP small/medium/large. Index 0 is
the COCO "AP" (itself a mean over classes and IoU thresholds); index 1 is AP50 and is never labelled mAP here.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global backend change).
All AP values stay fractions in [0, 1], exactly as logged; epochs are the 0-based ``epoch`` field of the log.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "AXIS_LABELS",
    "METRICS",
    "Curve",
    "LogFormatError",
    "Run",
    "RunSkippedWarning",
    "Variant",
    "find_run_dirs",
    "format_markdown",
    "group_runs",
    "last_progress",
    "load_run",
    "load_runs",
    "plot_loss_curves",
    "plot_metric_curves",
    "read_log",
    "save_figure",
    "variant_curve",
    "variant_table",
    "write_csv",
    "write_report",
]

EVAL_KEY = "test_coco_eval_bbox"

#: metric name -> index in ``test_coco_eval_bbox`` (pycocotools ``COCOeval.stats`` order).
METRICS: dict[str, int] = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5}

#: y-axis labels; AP50 / AP75 are single-IoU APs, not "mAP".
AXIS_LABELS: dict[str, str] = {
    "AP": "AP (COCO, IoU=.50:.95)",
    "AP50": "AP50 (COCO, IoU=.50)",
    "AP75": "AP75 (COCO, IoU=.75)",
    "APs": "AP small (IoU=.50:.95, area < 32²)",
    "APm": "AP medium (IoU=.50:.95, 32² ≤ area < 96²)",
    "APl": "AP large (IoU=.50:.95, area ≥ 96²)",
    "train_loss": "train loss",
    "test_loss": "test loss",
}

X_LABELS: dict[str, str] = {"epoch": "epoch", "hours": "wall-clock hours"}

PANEL_SETS: dict[str, tuple[str, ...]] = {
    "ap": ("AP",),
    "all": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
}

# Config keys that differ between seeds of one variant without defining it (used without overrides.json).
_IGNORED_DIFF_KEY = re.compile(r"(^|\.)(seed|output_dir|out_dir|tb_dir|log_dir|resume|device|run_name)$")


class LogFormatError(ValueError):
    """A ``log.txt`` line that is not valid JSON (the message names the file and line)."""


class RunSkippedWarning(UserWarning):
    """A run directory is ignored (no log, or no evaluated epoch yet)."""


# --------------------------------------------------------------------------------------------- reading runs


def read_log(path: str | os.PathLike[str], *, allow_partial_last: bool = True) -> list[dict[str, Any]]:
    """Parse a ``log.txt`` of JSON lines; return the records sorted by ``epoch``, one per epoch.

    A resumed run may log an epoch twice: the last record wins. A truncated *last* line (the trainer is
    writing it right now) is dropped when ``allow_partial_last``; any other malformed line raises
    :class:`LogFormatError` naming ``file:line``.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            is_last = all(not rest.strip() for rest in lines[i + 1 :])
            if allow_partial_last and is_last and not text.endswith("\n"):
                break
            raise LogFormatError(f"{path}:{i + 1}: not a JSON object ({e.msg})") from e
        if not isinstance(rec, dict) or "epoch" not in rec:
            raise LogFormatError(f"{path}:{i + 1}: expected a JSON object with an 'epoch' field")
        try:
            epoch = int(rec["epoch"])
        except (TypeError, ValueError) as e:
            raise LogFormatError(f"{path}:{i + 1}: 'epoch' is not an integer: {rec['epoch']!r}") from e
        if EVAL_KEY in rec:
            ev = rec[EVAL_KEY]
            if not isinstance(ev, list) or len(ev) < len(METRICS):
                raise LogFormatError(
                    f"{path}:{i + 1}: '{EVAL_KEY}' must be a list of >= {len(METRICS)} numbers, got {ev!r}"
                )
        by_epoch[epoch] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _coco_value(v: Any) -> float:
    """A COCO stat as float; pycocotools' -1 ("undefined") becomes NaN."""
    f = float(v) if v is not None else math.nan
    return math.nan if f < 0 else f


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


@dataclass
class Run:
    """One training run directory."""

    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] | None = None  # from overrides.json (seed excluded); None if absent
    seed: int | None = None

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if EVAL_KEY in r]

    def metric(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(epochs, values)`` of a COCO metric (``METRICS`` key) or a scalar log key (``train_loss``)."""
        if name in METRICS:
            recs = self.eval_records
            return (
                np.array([r["epoch"] for r in recs], dtype=np.int64),
                # pycocotools reports -1 where a metric is undefined (no ground truth in that area range)
                np.array([_coco_value(r[EVAL_KEY][METRICS[name]]) for r in recs], dtype=np.float64),
            )
        recs = [r for r in self.records if isinstance(r.get(name), (int, float))]
        return (
            np.array([r["epoch"] for r in recs], dtype=np.int64),
            np.array([float(r[name]) for r in recs], dtype=np.float64),
        )

    def hours(self) -> dict[int, float]:
        """epoch -> cumulative wall-clock hours at the end of that epoch (``elapsed``, else cumsum of
        ``epoch_time``)."""
        out: dict[int, float] = {}
        total = 0.0
        for r in self.records:
            if "epoch_time" in r:
                total += float(r["epoch_time"])
            if "elapsed" in r:
                out[int(r["epoch"])] = float(r["elapsed"]) / 3600.0
            elif "epoch_time" in r:
                out[int(r["epoch"])] = total / 3600.0
        return out


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """Load ``log.txt``, ``config.yaml`` (optional) and ``overrides.json`` (optional) of a run directory."""
    run_dir = Path(run_dir)
    records = read_log(run_dir / "log.txt")
    config: dict[str, Any] = {}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{cfg_path}: invalid YAML ({e})") from e
        config = loaded if isinstance(loaded, dict) else {}
    overrides: dict[str, str] | None = None
    seed: int | None = None
    ov_path = run_dir / "overrides.json"
    if ov_path.is_file():
        try:
            ov = json.loads(ov_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{ov_path}: invalid JSON ({e.msg})") from e
        if not isinstance(ov, dict) or not isinstance(ov.get("overrides", {}), dict):
            raise ValueError(f"{ov_path}: expected {{'overrides': {{key: value}}, 'seed': int}}")
        overrides = {str(k): str(v) for k, v in ov.get("overrides", {}).items() if k != "seed"}
        if ov.get("seed") is not None:
            seed = int(ov["seed"])
    if seed is None and isinstance(config.get("seed"), int):
        seed = int(config["seed"])
    return Run(path=run_dir, records=records, config=config, overrides=overrides, seed=seed)


def find_run_dirs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand paths into run directories: a dir with ``log.txt`` is a run; otherwise every dir below it
    containing ``log.txt`` (an ablation root). Sorted, duplicates removed."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run directory")
        if (p / "log.txt").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q.parent for q in p.rglob("log.txt")))
        else:
            raise FileNotFoundError(f"{p}: not a directory")
    seen: set[Path] = set()
    out: list[Path] = []
    for d in found:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            out.append(d)
    return out


def load_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Run]:
    """Load every run below ``paths``; runs without any evaluated epoch are skipped with a
    :class:`RunSkippedWarning`."""
    runs: list[Run] = []
    for d in find_run_dirs(paths):
        run = load_run(d)
        if not run.eval_records:
            warnings.warn(
                f"{d}: no evaluated epoch ('{EVAL_KEY}') in log.txt yet; run skipped",
                RunSkippedWarning,
                stacklevel=2,
            )
            continue
        runs.append(run)
    return runs


# --------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """Runs that differ only by seed."""

    label: str
    overrides: dict[str, str]
    runs: list[Run]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    return str(v)


def _config_diff_overrides(runs: Sequence[Run]) -> list[dict[str, str]]:
    """For runs without overrides.json: the config keys whose values differ among them (seed etc. ignored)."""
    flats = [_flatten(r.config) for r in runs]
    keys: list[str] = []
    for f in flats:
        for k in f:
            if k not in keys:
                keys.append(k)
    varying = [
        k
        for k in keys
        if not _IGNORED_DIFF_KEY.search(k) and len({_format_value(f.get(k, "<unset>")) for f in flats}) > 1
    ]
    return [{k: _format_value(f.get(k, "<unset>")) for k in varying} for f in flats]


def _fallback_label(runs: Sequence[Run]) -> str:
    names = [r.path.name for r in runs]
    prefix = os.path.commonprefix(names) if len(names) > 1 else names[0]
    prefix = re.sub(r"[_\-=.]*(seed[_\-=]?\d*)?$", "", prefix)
    return prefix or "run"


def group_runs(runs: Sequence[Run]) -> list[Variant]:
    """Group runs with identical overrides (seed excluded) into variants, in order of first appearance.

    Overrides come from ``overrides.json``; runs without it get the config keys that differ among such runs.
    The legend label is ``"k1=v1, k2=v2"`` in the overrides' order (a run-name fallback if there are none).
    """
    derived = _config_diff_overrides([r for r in runs if r.overrides is None])
    it = iter(derived)
    groups: dict[tuple[bool, tuple[tuple[str, str], ...]], tuple[dict[str, str], list[Run]]] = {}
    for r in runs:
        ov = r.overrides if r.overrides is not None else next(it)
        key = (r.overrides is not None, tuple(sorted(ov.items())))
        groups.setdefault(key, (dict(ov), []))[1].append(r)
    variants = []
    for ov, members in groups.values():
        label = ", ".join(f"{k}={v}" for k, v in ov.items()) if ov else _fallback_label(members)
        variants.append(Variant(label=label, overrides=ov, runs=members))
    labels = [v.label for v in variants]
    for v in variants:  # disambiguate identical labels (e.g. override-less runs from two roots)
        if labels.count(v.label) > 1:
            v.label = f"{v.label} [{v.runs[0].path.parent.name}/{v.runs[0].path.name}]"
    return variants


# --------------------------------------------------------------------------------------------- curves


@dataclass
class Curve:
    """A variant's curve over the epochs all its seeds share.

    ``values`` is (n_seeds, n_epochs); ``x`` is the epoch, or the mean over seeds of the wall-clock hours.
    """

    epochs: np.ndarray
    x: np.ndarray
    values: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def variant_curve(variant: Variant, metric: str = "AP", x: str = "epoch", band: str = "minmax") -> Curve:
    """Mean and band of ``metric`` over the variant's seeds on their common epochs.

    ``band="minmax"``: [min, max] over seeds. ``band="std"``: mean -+ sample std (ddof=1), zero for one seed.
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    if x not in X_LABELS:
        raise ValueError(f"x must be one of {sorted(X_LABELS)}, got {x!r}")
    series = [r.metric(metric) for r in variant.runs]
    common: set[int] | None = None
    for ep, _ in series:
        common = set(ep.tolist()) if common is None else common & set(ep.tolist())
    epochs = np.array(sorted(common or ()), dtype=np.int64)
    values = np.empty((len(series), len(epochs)), dtype=np.float64)
    for i, (ep, val) in enumerate(series):
        lookup = dict(zip(ep.tolist(), val.tolist(), strict=True))
        values[i] = [lookup[int(e)] for e in epochs]
    if len(epochs):
        mean = values.mean(axis=0)
        if band == "minmax":
            lo, hi = values.min(axis=0), values.max(axis=0)
        else:
            sd = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(epochs))
            lo, hi = mean - sd, mean + sd
    else:
        mean = lo = hi = np.empty(0)
    if x == "epoch":
        xs = epochs.astype(np.float64)
    else:
        hours = [r.hours() for r in variant.runs]
        missing = [
            (r.path, int(e)) for r, h in zip(variant.runs, hours, strict=True) for e in epochs if e not in h
        ]
        if missing:
            path, ep = missing[0]
            raise ValueError(
                f"{path}/log.txt: epoch {ep} has neither 'elapsed' nor 'epoch_time' (needed for hours)"
            )
        xs = np.array([np.mean([h[int(e)] for h in hours]) for e in epochs], dtype=np.float64)
    return Curve(epochs=epochs, x=xs, values=values, mean=mean, lo=lo, hi=hi)


def _draw(ax: Any, variants: Sequence[Variant], metric: str, x: str, band: str) -> None:
    """Mean line (label = variant label) and, for >1 seed, a fill_between band (label starts with '_')."""
    for i, v in enumerate(variants):
        c = variant_curve(v, metric, x=x, band=band)
        if not len(c.epochs):  # metric not logged by every seed on a common epoch: nothing to draw
            continue
        color = f"C{i % 10}"  # 10 colours, then the next 10 variants dashed, then dotted (with other markers)
        cycle = (i // 10) % 3
        linestyle, marker = ("-", "--", ":")[cycle], (("o", "s", "^")[cycle] if len(c.epochs) <= 30 else None)
        ax.plot(c.x, c.mean, color=color, linestyle=linestyle, marker=marker, markersize=3, linewidth=1.5,
                label=v.label)
        if len(v.runs) > 1:
            ax.fill_between(c.x, c.lo, c.hi, color=color, alpha=0.2, linewidth=0, label=f"_band {v.label}")
    if metric in METRICS and ax.lines and all(np.isnan(ln.get_ydata()).all() for ln in ax.lines):
        ax.text(
            0.5,
            0.5,
            "undefined (pycocotools -1):\nno ground truth in this range",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
        xs = np.concatenate([np.asarray(ln.get_xdata(), dtype=float) for ln in ax.lines])
        if xs.size and xs.min() < xs.max():
            ax.set_xlim(xs.min(), xs.max())
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(AXIS_LABELS.get(metric, metric))
    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _legend(fig: Figure, ax: Any) -> None:
    """Legend below the panels, with as many columns (at most 3) as the longest label leaves room for."""
    handles, labels = ax.get_legend_handles_labels()
    if not labels:
        return
    chars_per_inch = 12  # "small" font, with room for the line sample
    width = fig.get_size_inches()[0] * chars_per_inch
    ncols = max(1, min(3, len(labels), int(width // (max(len(label) for label in labels) + 6))))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small")


def _band_note(variants: Sequence[Variant], band: str) -> str:
    n = sorted({len(v.runs) for v in variants})
    seeds = "/".join(map(str, n))
    what = "min-max" if band == "minmax" else "±1 std"
    return f"mean over {seeds} seed(s), band: {what}"


def plot_metric_curves(
    variants: Sequence[Variant],
    panels: Sequence[str] | str = ("AP",),
    x: str = "epoch",
    band: str = "minmax",
) -> Figure:
    """One panel per metric (``METRICS`` keys, or ``"ap"`` / ``"all"``), a line (+ seed band) per variant."""
    if isinstance(panels, str):
        if panels not in PANEL_SETS:
            raise ValueError(f"panels must be one of {sorted(PANEL_SETS)} or a list of {list(METRICS)}")
        panels = PANEL_SETS[panels]
    for p in panels:
        if p not in METRICS:
            raise ValueError(f"unknown metric panel {p!r}; choose from {list(METRICS)}")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, panels, strict=False):
        _draw(ax, variants, metric, x, band)
        ax.set_title(metric)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _legend(fig, axes[0])
    fig.suptitle(
        f"COCO box AP over {'epochs' if x == 'epoch' else 'wall-clock time'} ({_band_note(variants, band)})",
        fontsize="medium",
    )
    return fig


def plot_loss_curves(variants: Sequence[Variant], x: str = "epoch", band: str = "minmax") -> Figure:
    """``train_loss`` (and ``test_loss`` when logged) over epochs / hours, one line (+ band) per variant."""
    keys = ["train_loss"]
    if any(r.metric("test_loss")[0].size for v in variants for r in v.runs):
        keys.append("test_loss")
    fig = Figure(figsize=(5.2 * len(keys), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=True):
        _draw(ax, variants, key, x, band)
        ax.set_title(key)
    _legend(fig, axes[0])
    fig.suptitle(f"Loss ({_band_note(variants, band)})", fontsize="medium")
    return fig


def save_figure(
    fig: Figure, stem: str | os.PathLike[str], formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Write ``stem.<fmt>`` for each format; returns the paths. The bounding box grows to hold a legend wider
    than the panels (long override labels), so no label is cut off."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(p, format=fmt, dpi=150, bbox_inches="tight", pad_inches=0.1)
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------- tables

TABLE_COLUMNS: list[tuple[str, str]] = [
    ("variant", "variant"),
    ("seeds", "seeds"),
    ("best_ap", "best AP"),
    ("best_epoch", "best epoch"),
    ("final_epoch", "final epoch"),
    ("final_ap", "final AP"),
    ("final_ap50", "final AP50"),
    ("final_ap75", "final AP75"),
    ("reach_epoch", "epoch AP≥{reach}"),
    ("sec_per_epoch", "s/epoch"),
    ("final_ap_min", "final AP min"),
    ("final_ap_max", "final AP max"),
]


def variant_table(variants: Sequence[Variant], reach: float | None = 0.3) -> list[dict[str, Any]]:
    """One row per variant, computed from the seed-mean curves on the common evaluated epochs.

    best AP / epoch: maximum of the mean AP curve (first epoch on ties); final AP / AP50 / AP75: mean at the
    last common epoch; reach_epoch: first epoch whose mean AP >= ``reach`` (None if never); sec_per_epoch:
    mean of ``epoch_time`` over all logged epochs of all seeds; final_ap_min / max: the seed spread
    of final AP. Epochs are the logged 0-based ones.
    """
    rows = []
    for v in variants:
        ap = variant_curve(v, "AP")
        row: dict[str, Any] = {"variant": v.label, "seeds": len(v.runs), "seed_list": v.seeds, "reach": reach}
        if len(ap.epochs):
            finite = np.isfinite(ap.mean)
            ib = int(np.argmax(np.where(finite, ap.mean, -np.inf)))
            row["best_ap"] = _num(ap.mean[ib])
            row["best_epoch"] = int(ap.epochs[ib]) if finite[ib] else None
            row["final_epoch"] = int(ap.epochs[-1])
            row["final_ap"] = _num(ap.mean[-1])
            row["final_ap50"] = _num(variant_curve(v, "AP50").mean[-1])
            row["final_ap75"] = _num(variant_curve(v, "AP75").mean[-1])
            row["final_ap_min"] = _num(ap.values[:, -1].min())
            row["final_ap_max"] = _num(ap.values[:, -1].max())
            hit = np.nonzero(finite & (ap.mean >= reach))[0] if reach is not None else np.empty(0, dtype=int)
            row["reach_epoch"] = int(ap.epochs[hit[0]]) if hit.size else None
        else:  # seeds share no evaluated epoch
            for k in (
                "best_ap",
                "best_epoch",
                "final_epoch",
                "final_ap",
                "final_ap50",
                "final_ap75",
                "final_ap_min",
                "final_ap_max",
                "reach_epoch",
            ):
                row[k] = None
        times = [float(r["epoch_time"]) for run in v.runs for r in run.records if "epoch_time" in r]
        row["sec_per_epoch"] = float(np.mean(times)) if times else None
        row["overrides"] = dict(v.overrides)
        rows.append(row)
    return rows


def _num(v: Any) -> float | None:
    """float, or None for NaN (an undefined COCO stat)."""
    f = float(v)
    return None if math.isnan(f) else f


def _fmt_cell(key: str, val: Any) -> str:
    if val is None:
        return "—"
    if key == "sec_per_epoch":
        return f"{val:.1f}"
    if isinstance(val, float):
        return f"{val:.3f}"
    return str(val)


def _headers(rows: Sequence[dict[str, Any]]) -> list[str]:
    reach = rows[0].get("reach") if rows else None
    return [h.format(reach=reach) for _, h in TABLE_COLUMNS]


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub Markdown table (AP as fractions with 3 decimals, as pycocotools prints them)."""
    head = _headers(rows)
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    for row in rows:
        cells = [_fmt_cell(k, row.get(k)).replace("|", "\\|") for k, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """CSV with full-precision numbers (empty cell for None); column names are the row keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in TABLE_COLUMNS]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for row in rows:
            w.writerow(
                [
                    "" if row.get(k) is None else repr(row[k]) if isinstance(row[k], float) else row[k]
                    for k in keys
                ]
            )
    return path


def write_report(
    paths: Iterable[str | os.PathLike[str]] | None = None,
    out: str | os.PathLike[str] = ".",
    *,
    runs: Sequence[Run] | None = None,
    x: str = "epoch",
    panels: Sequence[str] | str = "ap",
    band: str = "minmax",
    reach: float | None = 0.3,
) -> dict[str, Any]:
    """Load runs (or take ``runs``), write ``curves.png/.svg``, ``loss.png/.svg``, ``table.md``, ``table.csv``
    into ``out``. Returns ``{"variants", "rows", "files", "markdown"}``. Raises ValueError if no run has an
    evaluated epoch."""
    if runs is None:
        if paths is None:
            raise ValueError("write_report needs paths or runs")
        runs = load_runs(paths)
    if not runs:
        raise ValueError("no run with an evaluated epoch to plot")
    variants = group_runs(runs)
    out = Path(out)
    files: list[Path] = []
    files += save_figure(plot_metric_curves(variants, panels=panels, x=x, band=band), out / "curves")
    if any(r.metric("train_loss")[0].size for r in runs):
        files += save_figure(plot_loss_curves(variants, x=x, band=band), out / "loss")
    rows = variant_table(variants, reach=reach)
    md = format_markdown(rows)
    (out / "table.md").write_text(md, encoding="utf-8")
    files.append(out / "table.md")
    files.append(write_csv(rows, out / "table.csv"))
    return {"variants": variants, "rows": rows, "files": files, "markdown": md}


def last_progress(run_dir: str | os.PathLike[str]) -> tuple[int | None, float | None]:
    """``(last logged epoch, AP at the last evaluated epoch)`` of a run in progress; ``(None, None)`` if it
    has no log yet. Never raises on a half-written log."""
    p = Path(run_dir) / "log.txt"
    if not p.is_file():
        return None, None
    try:
        recs = read_log(p)
    except (OSError, LogFormatError, ValueError):
        return None, None
    if not recs:
        return None, None
    ev = [r for r in recs if EVAL_KEY in r]
    ap = float(ev[-1][EVAL_KEY][0]) if ev else None
    return int(recs[-1]["epoch"]), ap
