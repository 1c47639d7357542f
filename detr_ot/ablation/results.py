"""Collecting an ablation's results: curves and a table of the finished runs (:mod:`detr_ot.plots`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from detr_ot.ablation.plan import Job
from detr_ot.plots import load_runs, write_report


def plot_results(
    jobs: list[Job], root: Path, x: str = "epoch", panels: str = "ap", band: str = "minmax", reach: float = 0.3
) -> bool:
    """Curves and table of the finished/skipped runs under ``root`` (``x``, ``panels``, ``band``, ``reach`` as
    :func:`detr_ot.plots.write_report`); False (with a message) if nothing could be plotted."""
    dirs = [j.dir for j in jobs if j.status in ("finished", "skipped") and (j.dir / "log.txt").is_file()]
    if not dirs:
        print("[ablate] no finished run to plot")
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rep = write_report(runs=load_runs(dirs), out=root, x=x, panels=panels, band=band, reach=reach)
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
