"""faster_coco_eval: a C++ re-implementation of pycocotools' COCOeval behind the same Python API.

Its per-image records are opaque C++ objects: they pickle as they are, but serialising one per (image,
category, area range) costs more than its whole evaluation on one rank, so distributed runs gather the
detections on rank 0 by default."""

from __future__ import annotations

from typing import Any

from detr_ot.evaluation.backends.base import EVAL_BACKENDS
from detr_ot.evaluation.backends.cocoapi import CocoApiBackend


@EVAL_BACKENDS.register("faster_coco_eval")
class FasterCocoEvalBackend(CocoApiBackend):
    name = "faster_coco_eval"

    def __init__(self) -> None:
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as err:
            raise ImportError(
                "evaluation backend 'faster_coco_eval' needs the faster-coco-eval package: "
                "pip install faster-coco-eval (or set train.eval_backend=pycocotools)"
            ) from err
        self.coco_cls, self.eval_cls = COCO, COCOeval_faster

    def eval_kwargs(self, separate: bool) -> dict[str, Any]:
        return {"print_function": print, "separate_eval": separate}

    def encode(self, coco_eval: Any) -> Any:
        return coco_eval._evalImgs_cpp

    def decode(self, encoded: Any) -> list[Any]:
        return list(encoded)

    def set_per_image(self, coco_eval: Any, records: list[Any]) -> None:
        coco_eval._evalImgs_cpp = records
