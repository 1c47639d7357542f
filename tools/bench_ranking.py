"""Benchmark of the vectorised ranking losses (detr_ot/losses/ranking.py) against a per-positive loop.

Baseline: the design of the published AP-Loss / aLRP / RS reference code, written here: prune the negatives
below ``min positive - delta``, then loop over the positives in order of increasing score, each iteration
computing ``H`` against all relevant negatives and positives and accumulating the update. Both sides compute
the loss value and the full update (for aLRP also the localisation component and its gradient).

Usage: ``python tools/bench_ranking.py [--repeats 11] [--device cpu|cuda|all] [--threads N] [--no-memory]``.
Prints, per setting and loss, the median time (the two sides interleaved in rounds, so that the load of a
shared machine hits both alike) of the vectorised implementation and of the loop, the speedup (the median
over rounds of the loop/vectorised ratio within a round), the largest value/update difference between the
two, and the peak extra memory of each (CPU: from the profiler's allocation events; CUDA:
``torch.cuda.max_memory_allocated`` above the inputs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from detr_ot.losses.ranking import alrp_loss, ap_loss, rs_loss  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# baseline: per-positive loop over the pruned negatives
# ----------------------------------------------------------------------------------------------------------
def _step(x: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.clamp(x / (2 * delta) + 0.5, min=0, max=1)


def _prune(logits: torch.Tensor, pos: torch.Tensor, delta: float):
    fg = logits[pos]
    relevant = (~pos) & (logits >= fg.min() - delta)
    return fg, relevant, logits[relevant]


def loop_ap(logits, pos, delta=1.0):
    grad = torch.zeros_like(logits)
    fg, relevant, bg = _prune(logits, pos, delta)
    n = fg.numel()
    fg_grad, bg_grad, prec = torch.zeros_like(fg), torch.zeros_like(bg), torch.zeros_like(fg)
    best = 0.0
    for i in torch.argsort(fg):
        h_fg = _step(fg - fg[i], delta)
        h_fg[i] = 0
        h_bg = _step(bg - fg[i], delta)
        rank_pos = 1 + h_fg.sum()
        rank = rank_pos + h_bg.sum()
        current = rank_pos / rank
        if best <= current:
            best = current
            bg_grad += h_bg / rank
        else:
            bg_grad += h_bg / rank * ((1 - best) / (1 - current))
        fg_grad[i] = -(1 - best)
        prec[i] = best
    grad[pos] = fg_grad / n
    grad[relevant] = bg_grad / n
    return 1 - prec.mean(), grad


def loop_alrp(logits, pos, e_loc, delta=1.0, eps=1e-5):
    grad = torch.zeros_like(logits)
    fg, relevant, bg = _prune(logits, pos, delta)
    n = fg.numel()
    fg_grad, bg_grad = torch.zeros_like(fg), torch.zeros_like(bg)
    rank, prec = torch.zeros_like(fg), torch.zeros_like(fg)
    order = torch.argsort(fg)
    for i in order:
        h_fg = _step(fg - fg[i], delta)
        h_fg[i] = 0
        h_bg = _step(bg - fg[i], delta)
        rank_pos = 1 + h_fg.sum()
        n_fp = h_bg.sum()
        rank[i] = rank_pos + n_fp
        prec[i] = rank_pos / rank[i]
        if n_fp > eps:
            fg_grad[i] = -(torch.sum(h_fg * e_loc) + n_fp) / rank[i]
            bg_grad += h_bg * (-fg_grad[i] / n_fp)
    grad[pos] = fg_grad / n
    grad[relevant] = bg_grad / n
    return 1 - prec.mean(), grad, rank, order


def loop_rs(logits, pos, ious, delta=0.5, eps=1e-10):
    grad = torch.zeros_like(logits)
    fg, relevant, bg = _prune(logits, pos, delta)
    n = fg.numel()
    fg_grad, bg_grad = torch.zeros_like(fg), torch.zeros_like(bg)
    rank_err, sort_err = torch.zeros_like(fg), torch.zeros_like(fg)
    for i in torch.argsort(fg):
        h_fg = _step(fg - fg[i], delta)
        h_bg = _step(bg - fg[i], delta)
        rank_pos = h_fg.sum()
        n_fp = h_bg.sum()
        rank_err[i] = n_fp / (rank_pos + n_fp)
        current = torch.sum(h_fg * (1 - ious)) / rank_pos
        above = ious >= ious[i]
        target = h_fg * above
        sort_err[i] = current - torch.sum(target * (1 - ious)) / target.sum()
        if n_fp > eps:
            fg_grad[i] -= rank_err[i]
            bg_grad += h_bg * (rank_err[i] / n_fp)
        missorted = h_fg * ~above
        denom = missorted.sum()
        if denom > eps:
            fg_grad[i] -= sort_err[i]
            fg_grad += missorted * (sort_err[i] / denom)
    grad[pos] = fg_grad / n
    grad[relevant] = bg_grad / n
    return rank_err.mean() + sort_err.mean(), grad


# ----------------------------------------------------------------------------------------------------------
# the two sides of each comparison: (value, logits grad[, box grad])
# ----------------------------------------------------------------------------------------------------------
def run_loop(kind: str, logits, pos, extra, box):
    """Groups (rows) one after the other, as the reference code would be called per group."""
    values, grads, box_grads = [], [], []
    offset = 0
    box = box.detach().requires_grad_(True)
    for g in range(logits.shape[0]):
        p = int(pos[g].sum())
        ex = None if extra is None else extra[offset : offset + p]
        if kind == "ap":
            v, gr = loop_ap(logits[g], pos[g])
        elif kind == "rs":
            v, gr = loop_rs(logits[g], pos[g], ex)
        else:
            v, gr, rank, order = loop_alrp(logits[g], pos[g], ex)
            ordered = box[offset : offset + p][order].flip(0)
            loc = (torch.cumsum(ordered, 0) / rank[order].flip(0)).mean()
            loc.backward()
        values.append(v)
        grads.append(gr)
        offset += p
    value = torch.stack(values).mean()
    grad = torch.stack(grads) / logits.shape[0]
    if box.grad is not None:
        box_grads.append(box.grad / logits.shape[0])
    return value, grad, (box_grads[0] if box_grads else None)


def run_vectorised(kind: str, logits, pos, extra, box):
    x = logits.detach().requires_grad_(True)
    b = box.detach().requires_grad_(True)
    if kind == "ap":
        loss = ap_loss(x, pos)
    elif kind == "rs":
        loss = rs_loss(x, pos, extra)
    else:
        loss, w = alrp_loss(x, pos, extra)
        loss = loss + (w * b).sum()  # L_loc with the localisation weights (value not compared)
    loss.backward()
    return loss.detach(), x.grad, (b.grad if kind == "alrp" else None)


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def paired_median_ms(
    fns: list[Callable[[], object]], device: torch.device, repeats: int, block: int = 3
) -> tuple[list[float], list[float]]:
    """Median times of several functions, run in interleaved blocks of ``block`` calls each, so that load
    changes of the shared machine hit all of them alike (the first call of a block pays for the caches the
    other function left behind, as a call inside a training step would).

    Returns the median time of each function and, for each function, the median over the ``repeats``
    rounds of ``time(fns[0]) / time(f)`` within the round (a paired ratio: a round's calls are close in
    time, so slow drifts of the machine's speed cancel).
    """
    for fn in fns:  # warm-up: at least 2 calls and 0.2 s each (allocator, caches, clock ramp-up)
        start, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - start < 0.2:
            fn()
            calls += 1
    rounds = [[statistics.median(_time_ms(fn, device) for _ in range(block)) for fn in fns] for _ in range(repeats)]
    medians = [statistics.median(r[i] for r in rounds) for i in range(len(fns))]
    ratios = [statistics.median(r[0] / r[i] for r in rounds) for i in range(len(fns))]
    return medians, ratios


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def make_inputs(batch, queries, classes, pos_per_image, device, dtype, seed=0, spread="trained"):
    """Sigmoid logits of a DETR head: (batch, queries*classes); ~pos_per_image matched (query, class)."""
    g = torch.Generator().manual_seed(seed)
    if spread == "trained":  # most negatives far below the positives: heavy pruning
        logits = torch.randn(batch, queries * classes, generator=g) * 1.5 - 4.0
    else:  # early training: everything near the prior, few negatives pruned
        logits = torch.randn(batch, queries * classes, generator=g) * 0.5 - 4.6
    pos = torch.zeros(batch, queries * classes, dtype=torch.bool)
    for b in range(batch):
        q = torch.randperm(queries, generator=g)[:pos_per_image]
        c = torch.randint(classes, (pos_per_image,), generator=g)
        pos[b, q * classes + c] = True
    if spread == "trained":
        logits[pos] += 2.5
    p = int(pos.sum())
    ious = torch.rand(p, generator=g)
    e_loc = 1 - (torch.rand(p, generator=g) * 1.2 - 0.2)  # 1 - GIoU
    box = torch.rand(p, generator=g)
    to = dict(device=device, dtype=dtype)
    return logits.to(**to), pos.to(device), ious.to(**to), e_loc.to(**to), box.to(**to)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    settings = [
        # name, batch, queries, classes, positives per image, grouping, logit spread
        ("B4 Q100 per-batch", 4, 100, 80, 7, "batch", "trained"),
        ("B4 Q100 per-batch early", 4, 100, 80, 7, "batch", "early"),
        ("B4 Q100 per-image", 4, 100, 80, 7, "image", "trained"),
        ("B8 Q300 per-batch", 8, 300, 80, 7, "batch", "trained"),
        ("B8 Q300 per-batch early", 8, 300, 80, 7, "batch", "early"),
        ("B8 Q300 per-image", 8, 300, 80, 7, "image", "trained"),
    ]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, median of {args.repeats}")
    header = (
        f"{'device':6} {'setting':26} {'loss':5} {'P':>4} {'N':>7} {'kept@1':>6} {'vec ms':>8} "
        f"{'loop ms':>8} {'speedup':>7} {'max|dv|':>8} {'max|dg|':>8} {'vec MB':>7} {'loop MB':>7}"
    )
    print(header)
    for device in devices:
        for name, b, q, k, ppi, grouping, spread in settings:
            logits, pos, ious, e_loc, box = make_inputs(b, q, k, ppi, device, dtype, spread=spread)
            if grouping == "batch":
                logits, pos = logits.reshape(1, -1), pos.reshape(1, -1)
            fg_min = logits[pos].min()
            kept = float(((~pos) & (logits >= fg_min - 1.0)).sum()) / float((~pos).sum())
            for kind in ("ap", "alrp", "rs"):
                row = measure(kind, device, logits, pos, ious, e_loc, box, args.repeats, not args.no_memory)
                print(
                    f"{device.type:6} {name:26} {kind:5} {int(pos.sum()):4d} {logits.numel():7d} {kept:6.1%} {row}",
                    flush=True,
                )


def measure(kind, device, logits, pos, ious, e_loc, box, repeats, memory) -> str:
    """One table row: times, ratio, agreement and peak memory of the vectorised loss and of the loop."""
    extra = {"ap": None, "alrp": e_loc, "rs": ious}[kind]
    vec = partial(run_vectorised, kind, logits, pos, extra, box)
    loop = partial(run_loop, kind, logits, pos, extra, box)
    v1, g1, bg1 = vec()
    v2, g2, bg2 = loop()
    dg = float((g1 - g2).abs().max())
    if kind == "alrp":  # v1 includes L_loc = sum w * box, whose gradient (the weights) is bg1
        v1 = v1 - (bg1 * box).sum()
        dg = max(dg, float((bg1 - bg2).abs().max()))
    dv = abs(float(v1) - float(v2))
    (t_loop, t_vec), (_, speedup) = paired_median_ms([loop, vec], device, repeats)
    mem = (f"{peak_mb(vec, device):7.2f}", f"{peak_mb(loop, device):7.2f}") if memory else ("-", "-")
    return f"{t_vec:8.3f} {t_loop:8.3f} {speedup:6.1f}x {dv:8.1e} {dg:8.1e} {mem[0]:>7} {mem[1]:>7}"


if __name__ == "__main__":
    main()
