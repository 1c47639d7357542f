"""pycocotools: the reference implementation of COCO evaluation (Lin et al., "Microsoft COCO", ECCV 2014).

Its per-image records are Python dicts; for the distributed merge they travel as a few flat arrays holding
only the fields ``accumulate`` reads, so the merged accumulation sees exactly the records one process would
compute and gives identical numbers."""

from __future__ import annotations

from typing import Any

import numpy as np

from detr_ot.evaluation.backends.base import EVAL_BACKENDS
from detr_ot.evaluation.backends.cocoapi import CocoApiBackend


@EVAL_BACKENDS.register("pycocotools")
class PycocotoolsBackend(CocoApiBackend):
    """The reference; its per-image matching is the expensive part, so distributed runs spread it."""

    name = "pycocotools"
    per_image_default = True

    def __init__(self) -> None:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        self.coco_cls, self.eval_cls = COCO, COCOeval

    def encode(self, coco_eval: Any) -> dict[str, Any]:
        """Which entries exist, per entry the detection count D and ground-truth count G, ``dtScores`` (D),
        ``dtMatches != 0`` (T x D, matched or not: all ``accumulate`` uses), ``dtIgnore`` (T x D) and
        ``gtIgnore`` (G); the boolean arrays bit-packed."""
        entries = coco_eval.evalImgs
        present = np.asarray([e is not None for e in entries], dtype=bool)
        kept = [e for e in entries if e is not None]

        def cat(arrays: list, dtype: type) -> np.ndarray:
            if not arrays:
                return np.zeros(0, dtype)
            return np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays])

        return {
            "present": np.packbits(present),
            "n": len(entries),
            "T": len(coco_eval.params.iouThrs),
            "D": np.asarray([len(e["dtScores"]) for e in kept], dtype=np.int64),
            "G": np.asarray([len(e["gtIgnore"]) for e in kept], dtype=np.int64),
            "scores": cat([e["dtScores"] for e in kept], np.float64),
            "matched": np.packbits(cat([e["dtMatches"] for e in kept], bool)),
            "dt_ignore": np.packbits(cat([e["dtIgnore"] for e in kept], bool)),
            "gt_ignore": np.packbits(cat([e["gtIgnore"] for e in kept], bool)),
        }

    def decode(self, encoded: dict[str, Any]) -> list[Any]:
        """Entries in COCOeval's ``evalImgs`` layout, carrying only the fields ``accumulate`` reads."""
        n, num_thr = encoded["n"], encoded["T"]
        present = np.unpackbits(encoded["present"], count=n).astype(bool)
        d, g = encoded["D"], encoded["G"]
        td_ends = np.cumsum(d * num_thr)
        num_td = int(td_ends[-1]) if len(d) else 0
        matched = np.unpackbits(encoded["matched"], count=num_td).astype(bool)
        dt_ignore = np.unpackbits(encoded["dt_ignore"], count=num_td).astype(bool)
        gt_ignore = np.unpackbits(encoded["gt_ignore"], count=int(g.sum())).astype(bool)
        scores = np.split(encoded["scores"], np.cumsum(d)[:-1]) if len(d) else []
        m_parts = np.split(matched, td_ends[:-1]) if len(d) else []
        i_parts = np.split(dt_ignore, td_ends[:-1]) if len(d) else []
        g_parts = np.split(gt_ignore, np.cumsum(g)[:-1]) if len(g) else []
        out: list[Any] = [None] * n
        for slot, dd, s, m, ig, gi in zip(np.flatnonzero(present).tolist(), d.tolist(), scores, m_parts, i_parts,
                                          g_parts, strict=True):
            out[slot] = {"dtScores": s, "dtMatches": m.reshape(num_thr, dd), "dtIgnore": ig.reshape(num_thr, dd),
                         "gtIgnore": gi}
        return out

    def set_per_image(self, coco_eval: Any, records: list[Any]) -> None:
        coco_eval.evalImgs = records
