#!/usr/bin/env python
"""Plot COCO AP over epochs (or hours) and loss curves for runs, aggregated over seeds, plus a summary table.

    python tools/plot_curves.py RUN_DIR [RUN_DIR ...] [--out DIR] [--x epoch|hours] [--panels ap|all]
                                [--band minmax|std] [--reach 0.3]

RUN_DIR is a run directory (with log.txt) or any directory above runs, e.g. an ablation root. Writes
DIR/curves.png/.svg, DIR/loss.png/.svg, DIR/table.md and DIR/table.csv (DIR defaults to the single RUN_DIR,
else the current directory) and prints the Markdown table. See detr_ot/plots.py for the definitions.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_ot.plots import LogFormatError, write_report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or roots containing runs")
    p.add_argument("--out", default=None, help="output directory (default: the RUN_DIR if only one, else .)")
    p.add_argument(
        "--x", choices=["epoch", "hours"], default="epoch", help="x axis: epoch or wall-clock hours"
    )
    p.add_argument(
        "--panels", choices=["ap", "all"], default="ap", help="ap: AP only; all: AP/AP50/AP75/APs/m/l"
    )
    p.add_argument(
        "--band", choices=["minmax", "std"], default="minmax", help="seed band: min-max or +-1 std"
    )
    p.add_argument(
        "--reach", type=float, default=0.3, help="AP threshold for the 'first epoch reaching' column"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else (Path(args.run_dirs[0]) if len(args.run_dirs) == 1 else Path("."))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rep = write_report(
                args.run_dirs, out, x=args.x, panels=args.panels, band=args.band, reach=args.reach
            )
        except (FileNotFoundError, LogFormatError, ValueError) as e:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            print(f"error: {e}", file=sys.stderr)
            return 1
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(rep["markdown"], end="")
    print("wrote " + ", ".join(str(f) for f in rep["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
