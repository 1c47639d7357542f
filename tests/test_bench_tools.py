"""The benchmark tools still run, and their baselines agree with what they are compared against.

``tools/bench_ranking.py`` times the ranking losses against a per-positive loop written from the reference
code's design; that loop is a second, independent implementation, so its agreement with the vectorised
losses is checked here at float64 precision. ``tools/bench_matching.py`` runs end to end on a tiny problem.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"detr_ot_tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_ranking() -> ModuleType:
    return load_tool("bench_ranking")


@pytest.mark.parametrize("grouping", ["batch", "image"])
@pytest.mark.parametrize("kind", ["ap", "alrp", "rs"])
@pytest.mark.parametrize("spread", ["trained", "early"])
def test_ranking_benchmark_loop_agrees_with_the_losses(bench_ranking: ModuleType, kind: str, grouping: str,
                                                       spread: str) -> None:
    logits, pos, ious, e_loc, box = bench_ranking.make_inputs(3, 20, 6, 3, torch.device("cpu"), torch.float64,
                                                              seed=1, spread=spread)
    if grouping == "batch":
        logits, pos = logits.reshape(1, -1), pos.reshape(1, -1)
    extra = {"ap": None, "alrp": e_loc, "rs": ious}[kind]
    value, grad, box_grad = bench_ranking.run_vectorised(kind, logits, pos, extra, box)
    loop_value, loop_grad, loop_box_grad = bench_ranking.run_loop(kind, logits, pos, extra, box)
    if kind == "alrp":  # the vectorised value includes L_loc = sum(w * box), whose gradient is w
        value = value - (box_grad * box).sum()
        torch.testing.assert_close(box_grad, loop_box_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(value, loop_value, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, loop_grad, rtol=0, atol=1e-12)
    assert grad.abs().sum() > 0


def test_ranking_benchmark_row(bench_ranking: ModuleType) -> None:
    logits, pos, ious, e_loc, box = bench_ranking.make_inputs(2, 10, 5, 2, torch.device("cpu"), torch.float32)
    row = bench_ranking.measure("rs", torch.device("cpu"), logits.reshape(1, -1), pos.reshape(1, -1), ious, e_loc,
                                box, repeats=1, memory=False)
    fields = row.split()
    vec_ms, loop_ms, speedup, dv, dg = float(fields[0]), float(fields[1]), fields[2], float(fields[3]), float(fields[4])
    assert vec_ms > 0 and loop_ms > 0 and speedup.endswith("x")
    assert dv < 1e-6 and dg < 1e-6


def test_paired_timing_ratios(bench_ranking: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Medians per function and the median of the per-round ratios, on scripted times (no clock involved)."""

    def first() -> None: ...

    def second() -> None: ...

    # three rounds of three calls each; the machine slows down 10x after the first round, and in the last
    # round the second function is only 2x slower. Per-round medians: first (1, 10, 10), second (4, 40, 20).
    scripted = {first: iter([1, 1, 1, 10, 10, 10, 10, 11, 9]), second: iter([4, 4, 4, 40, 40, 40, 20, 19, 21])}
    monkeypatch.setattr(bench_ranking, "_time_ms", lambda fn, device: float(next(scripted[fn])))
    medians, ratios = bench_ranking.paired_median_ms([first, second], torch.device("cpu"), repeats=3, block=3)
    assert medians == [10.0, 20.0]
    # per-round ratios 1/4, 10/40, 10/20: their median is 0.25 (the ratio of the medians would say 0.5)
    assert ratios == [1.0, 0.25]


def test_matching_benchmark_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_matching.py"), "--device", "cpu", "--batch", "2", "--queries",
         "10", "--classes", "5", "--repeats", "1", "--iters", "5"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "identical assignments: 2/2 images" in out
    plan_gap = re.search(r"max \|plan - POT plan\| = (\S+)", out)
    assert plan_gap is not None and float(plan_gap.group(1)) < 1e-5
    assert out.count("backward") >= 4  # one line per GU target rule
    for row in ("sinkhorn unrolled", "sinkhorn implicit", "unbalanced OT", "one-to-many hard (k=6)"):
        ratio = re.search(re.escape(row) + r".*= +(\S+)x the Hungarian matcher", out)
        assert ratio is not None and float(ratio.group(1)) > 0
