"""Matching benchmark (issue 3): every figure measured side by side in one run, with its baseline and ratio.

1. Hungarian matcher (padded pairwise terms + cost + solve) vs a DETR-style baseline written here (full
   (B*Q) x sum(T) cost on the device, one copy to the CPU, scipy per image on the diagonal blocks); the
   assignments must be identical.
2. Batched log-domain Sinkhorn (B x Q x (Mmax+1), masks) vs a per-image loop of POT's ``sinkhorn_log`` at the
   same epsilon and iteration count (plans compared).
3. GU backward per target rule relative to the Hungarian forward (the exact solve).
4. Every matcher's training step (Sinkhorn unrolled and implicit, with supplies, unbalanced OT, the exact
   one-to-many assignment) relative to the Hungarian matcher's forward, interleaved in one measurement.

Ground-truth counts are drawn like COCO's (negative binomial, mean about 7, clipped to [1, 50]). Times are
medians over ``--repeats`` interleaved runs after a warm-up, wall clock and (in brackets) process CPU
time, which is the steadier figure on a shared machine.

    python tools/bench_matching.py [--device cpu|cuda|all] [--batch 32] [--queries 100] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr_ot.boxes import cxcywh_to_xyxy, pairwise_giou  # noqa: E402
from detr_ot.matching import (  # noqa: E402
    CostWeights,
    PaddedTargets,
    compute_pairwise_terms,
    matching_cost,
)
from detr_ot.matching.gu import GUOptions, gu_assign  # noqa: E402
from detr_ot.matching.hungarian import HungarianMatcher, solve_hungarian  # noqa: E402
from detr_ot.matching.sinkhorn import SinkhornMatcher, SinkhornOptions, _cost_scale, sinkhorn_log  # noqa: E402
from detr_ot.matching.supply import OneToManyMatcher, OneToManyOptions  # noqa: E402


def coco_like_counts(rng: np.random.Generator, batch: int, mean: float = 7.0, cap: int = 50) -> list[int]:
    """Objects per image: negative binomial with mean ``mean`` and dispersion 1 (COCO train2017 has mean 7.3,
    median 4 and a long tail), clipped to [1, cap]."""
    r = 1.0
    counts = rng.negative_binomial(r, r / (r + mean), size=batch)
    return [int(c) for c in np.clip(counts, 1, cap)]


def make_batch(batch: int, queries: int, classes: int, device: str, seed: int):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    counts = coco_like_counts(rng, batch)
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.8 + 0.1
        size = torch.rand(n, 2, generator=g) * 0.45 + 0.05
        labels = torch.randint(0, classes, (n,), generator=g)
        targets.append({"boxes": torch.cat([centre, size], 1).to(device), "labels": labels.to(device)})
    logits = torch.randn(batch, queries, classes + 1, generator=g).to(device)
    boxes = torch.randn(batch, queries, 4, generator=g).sigmoid().to(device)
    return logits, boxes, targets, counts


class Case:
    """A timed callable: ``fn()``, or ``fn(setup())`` with the setup untimed."""

    def __init__(self, fn: Callable, setup: Callable[[], object] | None = None) -> None:
        self.fn, self.setup = fn, setup
        self.wall: list[float] = []
        self.cpu: list[float] = []


def measure(cases: dict[str, Case], repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """Median wall and process-CPU seconds of each case. The cases are interleaved run by run, so a change
    of machine load hits every case alike; one warm-up round is discarded."""
    for i in range(repeats + 1):
        for case in cases.values():
            arg = case.setup() if case.setup is not None else None
            if device == "cuda":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            case.fn(arg) if case.setup is not None else case.fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                case.wall.append(time.perf_counter() - w0)
                case.cpu.append(time.process_time() - c0)
    return {k: (statistics.median(c.wall), statistics.median(c.cpu)) for k, c in cases.items()}


def detr_style_baseline(logits, boxes, targets, w: CostWeights) -> list[tuple[np.ndarray, np.ndarray]]:
    """DETR's original matcher structure (Carion et al. 2020), written for this benchmark: the cost of every
    query of the batch against every ground truth of the batch, then scipy on each image's diagonal block."""
    batch, queries = logits.shape[:2]
    prob = logits.flatten(0, 1).softmax(-1)
    out_boxes = boxes.flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    cost_class = -prob[:, tgt_ids]
    cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
    cost_giou = -pairwise_giou(cxcywh_to_xyxy(out_boxes), cxcywh_to_xyxy(tgt_boxes))
    cost = (w.cost_bbox * cost_bbox + w.cost_class * cost_class + w.cost_giou * cost_giou).view(
        batch, queries, -1
    )
    cost = cost.cpu()
    sizes = [len(t["labels"]) for t in targets]
    return [linear_sum_assignment(block[i]) for i, block in enumerate(cost.split(sizes, -1))]


def ours_hungarian(logits, boxes, targets, matcher: HungarianMatcher):
    padded = PaddedTargets.from_list(targets, logits.device)
    return matcher(compute_pairwise_terms(logits, boxes, padded))


def same_assignments(assignment, baseline, batch: int) -> int:
    b, q, g = (t.cpu().numpy() for t in assignment.matched_pairs())
    ours = [set() for _ in range(batch)]
    for bi, qi, gi in zip(b, q, g, strict=True):
        ours[bi].add((int(qi), int(gi)))
    return sum(ours[i] == set(zip(*(x.tolist() for x in baseline[i]), strict=True)) for i in range(batch))


def sinkhorn_problem(cost: torch.Tensor, gt_mask: torch.Tensor):
    """The matcher's balanced problem: max-normalised cost with a zero background column and marginals."""
    batch, queries, _ = cost.shape
    cost = cost / _cost_scale(cost, gt_mask, "max")[:, None, None]
    full = torch.cat([torch.zeros_like(cost[..., :1]), cost], -1)
    counts = gt_mask.sum(1)
    rows = torch.ones(batch, queries, dtype=cost.dtype, device=cost.device)
    cols = torch.cat([(queries - counts)[:, None].to(cost.dtype), gt_mask.to(cost.dtype)], 1)
    col_mask = torch.cat([torch.ones_like(gt_mask[:, :1]), gt_mask], 1)
    return full, rows, cols, col_mask


def pot_loop(full: torch.Tensor, cols: torch.Tensor, counts: list[int], eps: float, iters: int, device: str):
    """The per-image reference: POT ``sinkhorn_log`` on each image's real columns (numpy on CPU, torch on
    GPU)."""
    import ot

    if device == "cpu":
        full_np, cols_np = full.double().numpy(), cols.double().numpy()
        a = np.ones(full.shape[1])
        blocks = [(a, cols_np[b, : n + 1], full_np[b, :, : n + 1]) for b, n in enumerate(counts)]
    else:
        a = torch.ones(full.shape[1], device=full.device)
        blocks = [(a, cols[b, : n + 1], full[b, :, : n + 1]) for b, n in enumerate(counts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [
            ot.sinkhorn(a_, b_, m_, eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0, warn=False)
            for a_, b_, m_ in blocks
        ]


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0] * 1e3:8.2f} ms (cpu {t[1] * 1e3:7.2f})"


def line(
    name: str, ours: tuple[float, float], base_name: str, base: tuple[float, float], target: str = ""
) -> str:
    return (
        f"  {name}: {fmt(ours)} | {base_name}: {fmt(base)} | ratio {base[0] / ours[0]:5.1f}x "
        f"(cpu {base[1] / ours[1]:5.1f}x) {target}"
    )


def run(device: str, args: argparse.Namespace) -> None:
    weights = CostWeights()
    logits, boxes, targets, counts = make_batch(args.batch, args.queries, args.classes, device, args.seed)
    print(
        f"\n=== device {device} (torch threads {torch.get_num_threads()}): batch {args.batch}, queries "
        f"{args.queries}, ground truths per image mean {np.mean(counts):.1f} / max {max(counts)} / total "
        f"{sum(counts)}; medians of {args.repeats} runs"
    )
    reps = args.repeats

    # 1. Hungarian matcher vs the DETR-style full-batch baseline
    matcher = HungarianMatcher(weights)
    assignment = ours_hungarian(logits, boxes, targets, matcher)
    baseline = detr_style_baseline(logits, boxes, targets, weights)
    same = same_assignments(assignment, baseline, args.batch)
    t = measure(
        {
            "ours": Case(lambda: ours_hungarian(logits, boxes, targets, matcher)),
            "detr": Case(lambda: detr_style_baseline(logits, boxes, targets, weights)),
        },
        reps,
        device,
    )
    print("[1] Hungarian matcher (pairwise terms + cost + solve) vs DETR-style full (B*Q) x sum(T) baseline")
    print(line("padded per-image blocks", t["ours"], "DETR-style", t["detr"], "(target >= 5x)"))
    print(f"  identical assignments: {same}/{args.batch} images")

    # 2. batched Sinkhorn vs a per-image loop of POT
    padded = PaddedTargets.from_list(targets, device)
    terms = compute_pairwise_terms(logits, boxes, padded)
    cost = matching_cost(terms, weights, detach=True)
    full, rows, cols, col_mask = sinkhorn_problem(cost, padded.mask)
    eps, iters = args.epsilon, args.iters
    plan = sinkhorn_log(full, rows, cols, col_mask, eps, iters)
    ref = pot_loop(full, cols, counts, eps, iters, device)
    diff = max(
        float(np.abs(plan[b, :, : n + 1].double().cpu().numpy() - np.asarray(torch.as_tensor(r).cpu())).max())
        for b, (n, r) in enumerate(zip(counts, ref, strict=True))
    )

    def sinkhorn_no_grad():
        with torch.no_grad():
            sinkhorn_log(full, rows, cols, col_mask, eps, iters)

    t = measure(
        {
            "batched": Case(sinkhorn_no_grad),
            "pot": Case(lambda: pot_loop(full, cols, counts, eps, iters, device)),
        },
        max(3, reps // 2),
        device,
    )
    print(
        f"[2] Sinkhorn, epsilon {eps} on max-normalised cost, {iters} iterations, padded to "
        f"{args.batch} x {args.queries} x {full.shape[2]}"
    )
    print(line("batched sinkhorn (no graph)", t["batched"], "POT sinkhorn_log loop", t["pot"], "(target >= 10x)"))
    print(f"  max |plan - POT plan| = {diff:.2e}")

    # 3. GU backward per target rule vs the Hungarian forward (the exact solve)
    mask = padded.mask
    g = torch.randn(args.batch, args.queries, cost.shape[2] + 1, device=device)
    rules = {
        "identity (mean projection)": GUOptions(target="identity", projection="mean"),
        "identity (mean_norm projection)": GUOptions(target="identity", projection="mean_norm"),
        "blackbox (lambda 10)": GUOptions(target="blackbox"),
        "perturbed (K=8, sigma 0.5)": GUOptions(target="perturbed"),
    }
    cases = {"solve": Case(lambda: solve_hungarian(cost, mask))}
    for name, opts in rules.items():
        c = cost.clone().requires_grad_(True)

        def forward(opts=opts, c=c):
            return gu_assign(c, mask, opts, training=True)

        cases[name + " fwd"] = Case(forward)
        cases[name + " bwd"] = Case(lambda out, c=c: torch.autograd.grad(out, c, g), setup=forward)
    t = measure(cases, reps, device)
    print(
        f"[3] GU: backward per target rule vs the Hungarian forward solve (solve_hungarian {fmt(t['solve'])})"
    )
    for name in rules:
        bwd, fwd = t[name + " bwd"], t[name + " fwd"]
        print(
            f"  {name:32s} backward {fmt(bwd)} = {bwd[0] / t['solve'][0]:5.2f}x the solve "
            f"(cpu {bwd[1] / t['solve'][1]:5.2f}x) | forward {fmt(fwd)} = {fwd[0] / t['solve'][0]:5.2f}x "
            f"(cpu {fwd[1] / t['solve'][1]:5.2f}x)"
        )

    matcher_rows(device, args, logits, boxes, targets)


def matcher_rows(device: str, args: argparse.Namespace, logits, boxes, targets) -> None:  # noqa: ANN001
    """[4] Every matcher's training step against the Hungarian matcher's forward, interleaved in one measurement:
    targets padded, pairwise terms, the matcher, and (where the plan carries a gradient) the backward of a
    plan-weighted sum into the model outputs."""
    weights = CostWeights()
    eps, iters = args.epsilon, args.iters
    leaf = (logits.clone().requires_grad_(True), boxes.clone().requires_grad_(True))
    matchers = {
        "sinkhorn unrolled": SinkhornMatcher(weights, SinkhornOptions(epsilon=eps, iters=iters)),
        "sinkhorn implicit": SinkhornMatcher(weights, SinkhornOptions(epsilon=eps, iters=iters, gradient="implicit")),
        "sinkhorn implicit, supply k=6": SinkhornMatcher(
            weights, SinkhornOptions(epsilon=eps, iters=iters, gradient="implicit", supply="fixed", k=6)
        ),
        "sinkhorn implicit, dynamic k": SinkhornMatcher(
            weights, SinkhornOptions(epsilon=eps, iters=iters, gradient="implicit", supply="dynamic")
        ),
        "unbalanced OT (tau 1) unrolled": SinkhornMatcher(
            weights, SinkhornOptions(epsilon=eps, iters=iters, marginals="unbalanced", tau=1.0)
        ),
        "unbalanced OT (tau 1) implicit": SinkhornMatcher(
            weights, SinkhornOptions(epsilon=eps, iters=iters, marginals="unbalanced", tau=1.0, gradient="implicit")
        ),
        "one-to-many hard (k=6)": OneToManyMatcher(weights, OneToManyOptions(k=6)),
        "one-to-many hard (dynamic k)": OneToManyMatcher(weights, OneToManyOptions(supply="dynamic")),
    }

    def step(matcher) -> None:  # noqa: ANN001
        padded = PaddedTargets.from_list(targets, device)
        plan = matcher(compute_pairwise_terms(leaf[0], leaf[1], padded)).plan
        if plan.requires_grad:
            torch.autograd.grad(plan.sum() - 2 * plan[..., 0].sum(), leaf)

    def terms_step() -> None:
        padded = PaddedTargets.from_list(targets, device)
        cost = matching_cost(compute_pairwise_terms(leaf[0], leaf[1], padded), weights, detach=False)
        torch.autograd.grad(cost.sum(), leaf)

    hungarian = HungarianMatcher(weights)
    cases = {
        "hungarian": Case(lambda: ours_hungarian(logits, boxes, targets, hungarian)),
        "terms": Case(terms_step),
    }
    for name, matcher in matchers.items():
        cases[name] = Case(lambda matcher=matcher: step(matcher))
    t = measure(cases, max(3, args.repeats // 2), device)
    base, terms = t["hungarian"], t["terms"]
    print(f"[4] Matcher training steps (fwd + bwd where differentiable) vs the Hungarian matcher fwd {fmt(base)}, "
          f"epsilon {eps}, {iters} iterations. 'over terms': the step minus the pairwise terms' own fwd + bwd (a "
          f"training step pays that backward for the set loss anyway), in Hungarian matcher units")
    print(f"  {'pairwise terms + cost, fwd + bwd':32s} {fmt(terms)} = {terms[0] / base[0]:6.2f}x the Hungarian "
          f"matcher (cpu {terms[1] / base[1]:6.2f}x)")
    for name in matchers:
        target = " (target <= 3x)" if name == "sinkhorn implicit" else ""
        extra = ""
        if name.startswith(("sinkhorn", "unbalanced")):
            extra = f"; over terms {(t[name][1] - terms[1]) / base[1]:+6.2f}x (cpu)"
        print(f"  {name:32s} {fmt(t[name])} = {t[name][0] / base[0]:6.2f}x the Hungarian matcher "
              f"(cpu {t[name][1] / base[1]:6.2f}x){extra}{target}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=91)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). 1 by default: on a shared 2-core machine two intra-op "
        "threads wait on each other and timings swing 10x; scipy and POT are single-threaded anyway",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n(cuda not available: GPU figures skipped)")
            continue
        run(device, args)


if __name__ == "__main__":
    main()
