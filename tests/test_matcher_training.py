"""Every matcher (and every GU target rule) trains the tiny shapes config with a finite, decreasing loss."""

from __future__ import annotations

import math

import pytest
from conftest import SHAPES_YAML, read_log

from detr_ot.config import load_config
from detr_ot.engine.trainer import run
from detr_ot.matching import MATCHERS

VARIANTS = {
    "hungarian": ["matcher.name=hungarian"],
    "sinkhorn-soft-unrolled": ["matcher.name=sinkhorn", "matcher.sinkhorn.iters=20"],
    "sinkhorn-straight-through": ["matcher.name=sinkhorn", "matcher.sinkhorn.mode=hard",
                                  "matcher.sinkhorn.gradient=straight_through"],
    "sinkhorn-implicit-dynamic-k": ["matcher.name=sinkhorn", "matcher.sinkhorn.gradient=implicit",
                                    "matcher.sinkhorn.supply=dynamic"],
    "sinkhorn-unbalanced-implicit": ["matcher.name=sinkhorn", "matcher.sinkhorn.marginals=unbalanced",
                                     "matcher.sinkhorn.gradient=implicit"],
    "one-to-many": ["matcher.name=one_to_many", "matcher.one_to_many.k=2"],
    "gu-blackbox": ["matcher.name=gu", "matcher.gu.target=blackbox"],
    "gu-identity": ["matcher.name=gu", "matcher.gu.target=identity", "matcher.gu.scale=0.05"],
    "gu-perturbed": ["matcher.name=gu", "matcher.gu.target=perturbed", "matcher.gu.samples=4"],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_registered_matcher_is_covered() -> None:
    covered = {v[0].split("=")[1] for v in VARIANTS.values()}
    assert covered == set(MATCHERS.names())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matcher_trains(variant: str, tiny) -> None:  # noqa: ANN001
    cfg = load_config(SHAPES_YAML, tiny(*VARIANTS[variant], epochs=3))
    run(cfg, progress=False)
    log = read_log(cfg.output_dir)
    losses = [r["train_loss"] for r in log]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert all(math.isfinite(v) for r in log for k, v in r.items() if isinstance(v, float))
    assert losses[-1] < losses[0], losses
