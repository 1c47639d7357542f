#!/usr/bin/env python
"""Run a grid of training variants x seeds, each an ordinary tools/train.py run; then plot and tabulate them.

    python tools/ablate.py --config configs/shapes.yaml --out runs/matchers \\
        --grid matcher.name=hungarian,sinkhorn,gu --grid loss.cls=focal,rs --seeds 0 1 2 [--jobs N | --gpus 0,1]

``--help`` lists every flag. Planning, scheduling and plotting live in :mod:`detr_ot.ablation`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from detr_ot.ablation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
