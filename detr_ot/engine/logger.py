"""Run logging: one JSON line per epoch in ``<output_dir>/log.txt`` and TensorBoard scalars.
Only the main process writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from detr_ot import distributed as dist

COCO_STAT_NAMES = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
]  # fmt: skip


class RunLogger:
    def __init__(self, output_dir: str | Path, tb_dir: str | Path | None = None, tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.log_path = self.output_dir / "log.txt"
        self.writer = None
        if dist.is_main() and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir or self.output_dir / "tb"))

    def truncate_from(self, epoch: int) -> None:
        """Drop log lines of epochs >= ``epoch`` (a resumed run redoes them; no duplicated lines)."""
        if not dist.is_main() or not self.log_path.exists():
            return
        keep = [line for line in self.log_path.read_text().splitlines() if line.strip()
                and json.loads(line).get("epoch", -1) < epoch]
        self.log_path.write_text("".join(line + "\n" for line in keep))

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not dist.is_main():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            epoch = record["epoch"]
            for key, value in record.items():
                if isinstance(value, int | float) and key != "epoch" and math.isfinite(value):
                    group = "train" if key.startswith("train_") else "test" if key.startswith("test_") else "run"
                    self.writer.add_scalar(f"{group}/{key}", value, epoch)
            for name, value in zip(COCO_STAT_NAMES, record.get("test_coco_eval_bbox", []), strict=False):
                self.writer.add_scalar(f"coco/{name}", value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
