"""COCO evaluation backends (``train.eval_backend``), one small adapter module each, registered by name.

* ``pycocotools``: the reference.
* ``faster_coco_eval``: its C++ re-implementation; pycocotools' numbers to 1e-12 on our tests, not bit for bit.
* ``hotcoco`` (the default): a Rust re-implementation; pycocotools' numbers bit for bit on our tests.

A fourth backend is one module here (a subclass of :class:`EvalBackend` registered in :data:`EVAL_BACKENDS`)
plus one import line below.
"""

from __future__ import annotations

from detr_ot.evaluation.backends import (  # noqa: F401  (registration)
    faster_coco_eval_backend,
    hotcoco_backend,
    pycocotools_backend,
)
from detr_ot.evaluation.backends.base import DET_COLS, EVAL_BACKENDS, NUM_STATS, EvalBackend, result_records

__all__ = ["DET_COLS", "EVAL_BACKENDS", "NUM_STATS", "EvalBackend", "get_backend", "result_records"]


def get_backend(name: str) -> EvalBackend:
    """The backend registered as ``name``: ``ValueError`` naming the choices if there is none, ``ImportError``
    with the install command if its library is missing."""
    if name not in EVAL_BACKENDS:
        raise ValueError(f"CocoEvaluator: unknown backend {name!r}; choose one of {tuple(EVAL_BACKENDS.names())}")
    return EVAL_BACKENDS.build(name)
