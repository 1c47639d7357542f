"""detr_ot.plots and tools/plot_curves.py on hand-written run directories.

Expected numbers below are worked out by hand from the logs written in the fixtures (not recomputed with the
code under test).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detr_ot import plots  # noqa: E402
from detr_ot.plots import (  # noqa: E402
    AXIS_LABELS,
    LogFormatError,
    RunSkippedWarning,
    group_runs,
    load_runs,
    plot_loss_curves,
    plot_metric_curves,
    read_log,
    variant_curve,
    variant_table,
    write_report,
)

AR = [0.9] * 6  # AR entries (indices 6..11): a wrong index would pick 0.9


def stats(ap: float, ap50: float, ap75: float) -> list[float]:
    # APs/APm/APl = AP + 0.01/0.02/0.03 so that the index mapping 3/4/5 is checked too
    return [ap, ap50, ap75, ap + 0.01, ap + 0.02, ap + 0.03, *AR]


def write_run(
    d: Path, overrides: dict | None, seed: int, rows: list[dict], config: dict | None = None
) -> Path:
    d.mkdir(parents=True)
    if overrides is not None:
        (d / "overrides.json").write_text(json.dumps({"overrides": overrides, "seed": seed}))
    if config is not None:
        (d / "config.yaml").write_text(json.dumps(config))  # JSON is valid YAML
    elapsed = 0.0
    lines = []
    for r in rows:
        elapsed += r["t"]
        rec = {"epoch": r["e"], "train_loss": r["loss"], "epoch_time": r["t"], "elapsed": elapsed}
        if "ap" in r:
            rec["test_coco_eval_bbox"] = stats(r["ap"], r["ap50"], r["ap75"])
        if "tl" in r:
            rec["test_loss"] = r["tl"]
        lines.append(json.dumps(rec))
    (d / "log.txt").write_text("\n".join(lines) + "\n")
    return d


# Variant A (3 seeds, lengths 4/4/3; every epoch evaluated) ------------------------------------------------
A_AP = {0: [0.10, 0.20, 0.30, 0.35], 1: [0.12, 0.26, 0.32, 0.40], 2: [0.14, 0.23, 0.34]}
A_AP50 = {0: [0.3, 0.4, 0.50, 0.6], 1: [0.3, 0.4, 0.52, 0.6], 2: [0.3, 0.4, 0.54]}
A_AP75 = {0: [0.1, 0.2, 0.31, 0.4], 1: [0.1, 0.2, 0.33, 0.4], 2: [0.1, 0.2, 0.35]}
A_T = {0: 10.0, 1: 12.0, 2: [11.0, 11.0, 14.0]}
A_LOSS = {0: [3.0, 2.0, 1.0, 0.5], 1: [4.0, 3.0, 2.0, 1.0], 2: [5.0, 4.0, 3.0]}

# Variant B (2 seeds; seed 1 is evaluated every other epoch; dyadic values so means are exact) ---------------
B_AP = {0: [0.125, 0.25, 0.375, 0.5, 0.5, 0.625], 1: {0: 0.125, 2: 0.5, 4: 0.75}}
B_T = {0: 20.0, 1: 25.0}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "abl"
    for s in (0, 1, 2):
        t = A_T[s]
        rows = [
            {
                "e": e,
                "ap": A_AP[s][e],
                "ap50": A_AP50[s][e],
                "ap75": A_AP75[s][e],
                "t": t[e] if isinstance(t, list) else t,
                "loss": A_LOSS[s][e],
                "tl": A_LOSS[s][e] + 1.0,
            }
            for e in range(len(A_AP[s]))
        ]
        write_run(r / f"matcher.name=hungarian__seed={s}", {"matcher.name": "hungarian"}, s, rows)
    rows0 = [
        {"e": e, "ap": v, "ap50": 2 * v, "ap75": v / 2, "t": 20.0, "loss": 1.0} for e, v in enumerate(B_AP[0])
    ]
    write_run(r / "matcher.name=sinkhorn__seed=0", {"matcher.name": "sinkhorn"}, 0, rows0)
    rows1 = []
    for e in range(5):
        row = {"e": e, "t": 25.0, "loss": 2.0}
        if e in B_AP[1]:
            v = B_AP[1][e]
            row.update(ap=v, ap50=2 * v, ap75=v / 2)
        rows1.append(row)
    write_run(r / "matcher.name=sinkhorn__seed=1", {"matcher.name": "sinkhorn"}, 1, rows1)
    return r


def variants_of(root: Path) -> dict[str, plots.Variant]:
    return {v.label: v for v in group_runs(load_runs([root]))}


A, B = "matcher.name=hungarian", "matcher.name=sinkhorn"


def test_grouping_and_seeds(root: Path) -> None:
    vs = variants_of(root)
    assert list(vs) == [A, B]
    assert sorted(vs[A].seeds) == [0, 1, 2]
    assert sorted(vs[B].seeds) == [0, 1]


def test_minmax_band_on_common_epochs(root: Path) -> None:
    vs = variants_of(root)
    c = variant_curve(vs[A], "AP", band="minmax")
    assert c.epochs.tolist() == [0, 1, 2]  # seed 2 stops at epoch 2
    assert c.mean == pytest.approx([0.12, 0.23, 0.32], abs=1e-12)
    assert c.lo.tolist() == [0.10, 0.20, 0.30]
    assert c.hi.tolist() == [0.14, 0.26, 0.34]
    cb = variant_curve(vs[B], "AP", band="minmax")
    assert cb.epochs.tolist() == [0, 2, 4]  # seed 1 evaluates every other epoch
    assert cb.mean.tolist() == [0.125, 0.4375, 0.625]
    assert cb.lo.tolist() == [0.125, 0.375, 0.5]
    assert cb.hi.tolist() == [0.125, 0.5, 0.75]


def test_std_band(root: Path) -> None:
    vs = variants_of(root)
    c = variant_curve(vs[A], "AP", band="std")
    # sample std (ddof=1): deviations (-.02, 0, .02) -> .02; (-.03, .03, 0) -> .03
    assert (c.hi - c.mean) == pytest.approx([0.02, 0.03, 0.02], abs=1e-12)
    assert (c.mean - c.lo) == pytest.approx([0.02, 0.03, 0.02], abs=1e-12)
    cb = variant_curve(vs[B], "AP", band="std")
    sd = [0.0, 0.125 / math.sqrt(2), 0.25 / math.sqrt(2)]  # |a - b| / sqrt(2) for two seeds
    assert (cb.hi - cb.mean) == pytest.approx(sd, abs=1e-12)
    with pytest.raises(ValueError, match="band"):
        variant_curve(vs[A], "AP", band="iqr")


def test_other_metric_indices(root: Path) -> None:
    vs = variants_of(root)
    assert variant_curve(vs[A], "AP50").mean[-1] == pytest.approx(0.52, abs=1e-12)
    assert variant_curve(vs[A], "AP75").mean[-1] == pytest.approx(0.33, abs=1e-12)
    for name, off in (("APs", 0.01), ("APm", 0.02), ("APl", 0.03)):
        assert variant_curve(vs[A], name).mean == pytest.approx(np.array([0.12, 0.23, 0.32]) + off, abs=1e-12)


def test_table_numbers_are_the_logged_ones(root: Path) -> None:
    rows = {r["variant"]: r for r in variant_table(group_runs(load_runs([root])), reach=0.3)}
    a, b = rows[A], rows[B]
    assert a["seeds"] == 3 and b["seeds"] == 2
    assert a["best_ap"] == pytest.approx(0.32, abs=1e-12) and a["best_epoch"] == 2
    assert a["final_epoch"] == 2 and a["final_ap"] == pytest.approx(0.32, abs=1e-12)
    assert a["final_ap50"] == pytest.approx(0.52, abs=1e-12)
    assert a["final_ap75"] == pytest.approx(0.33, abs=1e-12)
    assert a["reach_epoch"] == 2  # mean AP 0.12, 0.23, 0.32
    assert (a["final_ap_min"], a["final_ap_max"]) == (0.30, 0.34)
    assert a["sec_per_epoch"] == pytest.approx((4 * 10 + 4 * 12 + 11 + 11 + 14) / 11)
    assert b["best_ap"] == 0.625 and b["best_epoch"] == 4
    assert b["final_epoch"] == 4 and b["final_ap"] == 0.625
    assert b["final_ap50"] == 1.25 and b["final_ap75"] == 0.3125
    assert b["reach_epoch"] == 2  # means 0.125, 0.4375, 0.625 on epochs 0, 2, 4
    assert (b["final_ap_min"], b["final_ap_max"]) == (0.5, 0.75)
    assert b["sec_per_epoch"] == pytest.approx((6 * 20 + 5 * 25) / 11)
    rows5 = {r["variant"]: r for r in variant_table(group_runs(load_runs([root])), reach=0.5)}
    assert rows5[A]["reach_epoch"] is None and rows5[B]["reach_epoch"] == 4


def test_best_differs_from_final(tmp_path: Path) -> None:
    rows = [
        {"e": e, "ap": v, "ap50": v, "ap75": v, "t": 5.0, "loss": 1.0} for e, v in enumerate([0.1, 0.4, 0.3])
    ]
    write_run(tmp_path / "r", {"x": "1"}, 0, rows)
    (row,) = variant_table(group_runs(load_runs([tmp_path])), reach=0.2)
    assert (row["best_ap"], row["best_epoch"], row["final_ap"], row["reach_epoch"]) == (0.4, 1, 0.3, 1)
    assert row["sec_per_epoch"] == 5.0 and row["final_ap_min"] == row["final_ap_max"] == 0.3


def _fill_y_at(coll, x: float) -> set[float]:
    verts = np.concatenate([p.vertices for p in coll.get_paths()])
    return {round(float(y), 12) for xx, y in verts if abs(xx - x) < 1e-12}


def test_figure_line_and_band_data(root: Path) -> None:
    vs = list(variants_of(root).values())
    fig = plot_metric_curves(vs, panels="all", band="minmax")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == [
        AXIS_LABELS[m] for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    ]
    ap_ax, ap50_ax = axes[0], axes[1]
    lines = {ln.get_label(): ln for ln in ap_ax.lines}
    assert list(lines[A].get_xdata()) == [0, 1, 2]
    assert list(lines[A].get_ydata()) == pytest.approx([0.12, 0.23, 0.32], abs=1e-12)
    assert list(lines[B].get_xdata()) == [0, 2, 4]
    assert list(lines[B].get_ydata()) == [0.125, 0.4375, 0.625]
    assert len(ap_ax.collections) == 2  # one band per multi-seed variant
    band_a, band_b = ap_ax.collections
    for x, lo, hi in zip([0, 1, 2], [0.10, 0.20, 0.30], [0.14, 0.26, 0.34], strict=True):
        assert _fill_y_at(band_a, x) == {round(lo, 12), round(hi, 12)}
    for x, lo, hi in zip([0, 2, 4], [0.125, 0.375, 0.5], [0.125, 0.5, 0.75], strict=True):
        assert _fill_y_at(band_b, x) == {lo, hi}
    ap50 = {ln.get_label(): ln for ln in ap50_ax.lines}
    assert list(ap50[B].get_ydata()) == [0.25, 0.875, 1.25]
    # legend labels come from the overrides
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [A, B]

    fig_std = plot_metric_curves(vs, panels=("AP",), band="std")
    (ax,) = fig_std.axes
    band_b = ax.collections[1]
    m, sd = 0.625, 0.25 / math.sqrt(2)
    assert _fill_y_at(band_b, 4) == {round(m - sd, 12), round(m + sd, 12)}


def test_axis_labels_never_call_ap50_map(root: Path) -> None:
    fig = plot_metric_curves(list(variants_of(root).values()), panels="all")
    texts = [ax.get_ylabel() for ax in fig.axes] + [ax.get_title() for ax in fig.axes]
    texts.append(fig.get_suptitle())
    assert all("mAP" not in t for t in texts), texts
    ap50_axes = [ax for ax in fig.axes if ax.get_title() == "AP50"]
    assert len(ap50_axes) == 1 and ap50_axes[0].get_ylabel().startswith("AP50")
    assert fig.axes[0].get_ylabel() == "AP (COCO, IoU=.50:.95)"


def test_hours_axis(root: Path) -> None:
    vs = variants_of(root)
    fig = plot_metric_curves([vs[B]], x="hours")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "wall-clock hours"
    # elapsed seed 0: 20, 60, 100 s; seed 1: 25, 75, 125 s at epochs 0, 2, 4
    assert list(ax.lines[0].get_xdata()) == pytest.approx([22.5 / 3600, 67.5 / 3600, 112.5 / 3600])


def test_loss_curves(root: Path) -> None:
    vs = list(variants_of(root).values())
    fig = plot_loss_curves(vs)
    train_ax, test_ax = fig.axes
    tr = {ln.get_label(): ln for ln in train_ax.lines}
    assert list(tr[A].get_ydata()) == pytest.approx([4.0, 3.0, 2.0])
    assert list(tr[B].get_xdata()) == [0, 1, 2, 3, 4]  # train loss is logged every epoch
    assert list(tr[B].get_ydata()) == [1.5] * 5
    te = {ln.get_label(): ln for ln in test_ax.lines}
    assert list(te) == [A]  # variant B logs no test_loss
    assert list(te[A].get_ydata()) == pytest.approx([5.0, 4.0, 3.0])


def test_write_report_files_and_tables(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    rep = write_report([root], out, panels="all", reach=0.3)
    for name in ("curves.png", "curves.svg", "loss.png", "loss.svg", "table.md", "table.csv"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "curves.svg").read_text()
    md = (out / "table.md").read_text().splitlines()
    assert "epoch AP≥0.3" in md[0] and "mAP" not in md[0]
    row_b = next(line for line in md if line.startswith(f"| {B} "))
    assert [c.strip() for c in row_b.strip("|").split("|")] == [
        B,
        "2",
        "0.625",
        "4",
        "4",
        "0.625",
        "1.250",
        "0.312",
        "2",
        "22.3",
        "0.500",
        "0.750",
    ]
    with (out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    by = {r["variant"]: r for r in rows}
    assert float(by[B]["final_ap"]) == 0.625 and int(by[B]["best_epoch"]) == 4
    assert float(by[A]["final_ap_min"]) == 0.30 and float(by[A]["final_ap_max"]) == 0.34
    assert float(by[A]["final_ap"]) == rep["rows"][0]["final_ap"]  # full precision round-trip


def test_skips_runs_without_eval(root: Path) -> None:
    d = root / "matcher.name=gu__seed=0"
    d.mkdir()
    (d / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 1.0, "epoch_time": 3.0}) + "\n")
    (d / "overrides.json").write_text(json.dumps({"overrides": {"matcher.name": "gu"}, "seed": 0}))
    e = root / "empty"
    e.mkdir()
    (e / "log.txt").write_text("")
    with pytest.warns(RunSkippedWarning) as rec:
        runs = load_runs([root])
    assert len(runs) == 5
    assert {Path(str(w.message).split(":")[0]).name for w in rec} == {d.name, "empty"}


def test_read_log_partial_and_corrupt_lines(tmp_path: Path) -> None:
    p = tmp_path / "log.txt"
    good = json.dumps({"epoch": 0, "train_loss": 1.0})
    p.write_text(good + "\n" + '{"epoch": 1, "train_lo')  # trainer mid-write
    assert [r["epoch"] for r in read_log(p)] == [0]
    p.write_text(good + "\n{oops\n" + json.dumps({"epoch": 2}) + "\n")
    with pytest.raises(LogFormatError, match=r"log\.txt:2"):
        read_log(p)
    # a resumed run re-logging an epoch: the last record wins, sorted by epoch
    p.write_text(
        "\n".join(json.dumps(r) for r in [{"epoch": 1, "v": 1}, {"epoch": 0, "v": 0}, {"epoch": 1, "v": 2}])
    )
    assert [(r["epoch"], r["v"]) for r in read_log(p)] == [(0, 0), (1, 2)]
    p.write_text(json.dumps({"epoch": 0, "test_coco_eval_bbox": [0.1, 0.2]}) + "\n")
    with pytest.raises(LogFormatError, match="test_coco_eval_bbox"):
        read_log(p)


def test_grouping_from_config_diff(tmp_path: Path) -> None:
    row = [{"e": 0, "ap": 0.5, "ap50": 0.5, "ap75": 0.5, "t": 1.0, "loss": 1.0}]
    for m in ("hungarian", "sinkhorn"):
        for s in (0, 1):
            cfg = {"matcher": {"name": m}, "seed": s, "output_dir": f"/x/{m}{s}", "optim": {"lr": 1e-4}}
            write_run(tmp_path / f"{m}_seed{s}", None, s, row, config=cfg)
    vs = group_runs(load_runs([tmp_path]))
    assert [v.label for v in vs] == ["matcher.name=hungarian", "matcher.name=sinkhorn"]
    assert [sorted(v.seeds) for v in vs] == [[0, 1], [0, 1]]


def _load_cli():
    spec = importlib.util.spec_from_file_location("plot_curves_cli", ROOT / "tools" / "plot_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_curves_cli(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = _load_cli()
    out = tmp_path / "o"
    rc = cli.main([str(root), "--out", str(out), "--x", "hours", "--band", "std", "--reach", "0.5"])
    assert rc == 0
    assert (out / "curves.svg").is_file() and (out / "table.csv").is_file()
    assert "epoch AP≥0.5" in capsys.readouterr().out
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 1.0}) + "\n")
    assert cli.main([str(nothing)]) == 1
    err = capsys.readouterr().err
    assert "no evaluated epoch" in err and "error:" in err


def test_pycocotools_minus_one_is_undefined(tmp_path: Path) -> None:
    # pycocotools writes -1 for a metric without ground truth (here: no large objects, APl = stats[5])
    for s in (0, 1):
        d = tmp_path / f"r{s}"
        d.mkdir()
        lines = []
        for e, ap in enumerate([0.25, 0.5]):
            st = [ap, ap, ap, ap, ap, -1.0, *AR]
            lines.append(json.dumps({"epoch": e, "test_coco_eval_bbox": st, "epoch_time": 1.0}))
        (d / "log.txt").write_text("\n".join(lines) + "\n")
        (d / "overrides.json").write_text(json.dumps({"overrides": {"m": "x"}, "seed": s}))
    vs = group_runs(load_runs([tmp_path]))
    c = variant_curve(vs[0], "APl")
    assert c.epochs.tolist() == [0, 1] and np.isnan(c.mean).all() and np.isnan(c.lo).all()
    fig = plot_metric_curves(vs, panels="all")
    apl_ax = next(ax for ax in fig.axes if ax.get_title() == "APl")
    assert any("undefined" in t.get_text() for t in apl_ax.texts)
    (row,) = variant_table(vs)
    assert row["final_ap"] == 0.5 and row["best_epoch"] == 1
    # AP itself undefined (no ground truth at all): no number is made up
    for s in (0, 1):
        p = tmp_path / f"r{s}" / "log.txt"
        p.write_text(p.read_text().replace("[0.25, 0.25", "[-1.0, 0.25").replace("[0.5, 0.5", "[-1.0, 0.5"))
    (row,) = variant_table(group_runs(load_runs([tmp_path])))
    assert row["best_ap"] is None and row["best_epoch"] is None and row["final_ap"] is None
    assert row["reach_epoch"] is None and row["final_ap50"] == 0.5


def test_many_variants_stay_distinguishable(tmp_path: Path) -> None:
    """Past 10 variants the colours repeat, so the line style (and marker) changes: no two curves look alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _draw, group_runs, load_runs = plots._draw, plots.group_runs, plots.load_runs

    variants = []
    for i in range(23):
        d = tmp_path / f"v{i:02d}__seed=0"
        d.mkdir()
        (d / "log.txt").write_text(
            "".join(json.dumps({"epoch": e, "test_coco_eval_bbox": [0.01 * (i + e)] + [0.0] * 11}) + "\n"
                    for e in range(3))
        )
        variants.extend(group_runs(load_runs([d])))
    fig, ax = plt.subplots()
    _draw(ax, variants, "AP", "epoch", "minmax")
    looks = [(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in ax.lines]
    plt.close(fig)
    assert len(looks) == 23 and len(set(looks)) == 23


def test_saved_figure_holds_a_legend_wider_than_the_panels(tmp_path: Path) -> None:
    """A long override label makes the legend wider than the figure: the saved image grows to hold it."""
    import matplotlib.image

    widths = {}
    for key, name in (("short", "a=1"), ("long", "k=" + "x" * 160)):
        d = tmp_path / key / f"{name}__seed=0"
        d.mkdir(parents=True)
        (d / "overrides.json").write_text(json.dumps({"overrides": {name.split("=")[0]: name[2:]}, "seed": 0}))
        (d / "log.txt").write_text(
            "".join(json.dumps({"epoch": e, "test_coco_eval_bbox": [0.1 * e] + [0.0] * 11}) + "\n" for e in range(3))
        )
        fig = plot_metric_curves(group_runs(load_runs([d])))
        (png,) = plots.save_figure(fig, tmp_path / key / "curves", formats=("png",))
        widths[key] = matplotlib.image.imread(png).shape[1]
        legend = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
        assert legend.width > 0
    # a 160-character label in the "small" font is several inches wider than the 5.2-inch figure; cut to the
    # figure's width, both images would be 5.2 * 150 px wide
    assert widths["long"] > 1.5 * widths["short"]
