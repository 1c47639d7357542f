"""detr_ot.ablation (the tools/ablate.py CLI) with a fake trainer (fast) and, marked slow, with the real
tools/train.py."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detr_ot.ablation import cli, plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A stand-in for tools/train.py: same CLI, writes config.yaml / log.txt / finished.json in the run-output
# format, resumes from its own log, records each invocation in calls.jsonl.
# AP = 0.1 * (epoch + 1) * gain + 0.01 * seed, gain 1 for hungarian and 2 for sinkhorn;
# matcher.name=broken crashes with return code 3.
FAKE_TRAIN = r"""
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--output-dir", required=True)
p.add_argument("--device", default=None)
p.add_argument("--no-progress", action="store_true")
p.add_argument("overrides", nargs="*")
a = p.parse_args()
ov = dict(o.split("=", 1) for o in a.overrides)
out = a.output_dir
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
print("fake train starting", ov, flush=True)
if ov.get("matcher.name") == "broken":
    print("Traceback (most recent call last):\nRuntimeError: boom in the broken matcher", flush=True)
    sys.exit(3)
epochs = int(ov.get("train.epochs", 3))
seed = int(ov["seed"])
gain = {"hungarian": 1.0, "sinkhorn": 2.0}.get(ov.get("matcher.name"), 1.0)
with open(os.path.join(out, "config.yaml"), "w") as f:
    cfg = {"train": {"epochs": epochs}, "seed": seed, "matcher": {"name": ov.get("matcher.name")}}
    f.write(json.dumps(cfg))
log = os.path.join(out, "log.txt")
start = 0
if os.path.exists(log):
    with open(log) as f:
        start = len([ln for ln in f if ln.strip()])
for e in range(start, epochs):
    time.sleep(float(ov.get("fake.sleep", 0)))
    ap = round(0.1 * (e + 1) * gain + 0.01 * seed, 6)
    rec = {"epoch": e, "train_loss": 2.0 - 0.1 * e, "epoch_time": 2.0, "elapsed": 2.0 * (e + 1),
           "test_coco_eval_bbox": [ap, ap + 0.2, ap + 0.1] + [ap] * 9, "n_parameters": 10}
    with open(log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if ov.get("fake.crash_once_after") == str(e) and not os.path.exists(os.path.join(out, "crashed")):
        open(os.path.join(out, "crashed"), "w").close()
        print("simulated interruption", flush=True)
        sys.exit(1)
with open(os.path.join(out, "finished.json"), "w") as f:
    json.dump({"epochs": epochs}, f)
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    cfg = tmp_path / "base.yaml"
    cfg.write_text("train:\n  epochs: 3\n")
    return {"fake": str(fake), "cfg": str(cfg), "out": str(tmp_path / "abl")}


def base_args(env: dict[str, str], *more: str) -> list[str]:
    return [
        "--config",
        env["cfg"],
        "--out",
        env["out"],
        "--train-script",
        env["fake"],
        "--poll",
        "0.05",
        *more,
    ]


def calls(run_dir: Path) -> list[dict]:
    p = run_dir / "calls.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def test_grid_parsing_and_names() -> None:
    assert plan.split_values("a,b , c") == ["a", "b", "c"]
    assert plan.split_values("[1,2],[3,4]") == ["[1,2]", "[3,4]"]
    assert plan.split_values("'x,y',z") == ["'x,y'", "z"]
    grid = plan.parse_grid(["matcher.name=hungarian,sinkhorn", "loss.cls=focal,rs"])
    assert grid == {"matcher.name": ["hungarian", "sinkhorn"], "loss.cls": ["focal", "rs"]}
    for bad in (["seed=0,1"], ["a=1", "a=2"], ["novalue"], ["a=1,,2"], ["a=1,1"]):
        with pytest.raises(ValueError):
            plan.parse_grid(bad)
    jobs = plan.expand(grid, [0, 1], Path("R"))
    assert len(jobs) == 8
    assert [j.name for j in jobs[:4]] == [
        "matcher.name=hungarian__loss.cls=focal__seed=0",
        "matcher.name=hungarian__loss.cls=rs__seed=0",
        "matcher.name=sinkhorn__loss.cls=focal__seed=0",
        "matcher.name=sinkhorn__loss.cls=rs__seed=0",
    ]
    assert [j.seed for j in jobs] == [0] * 4 + [1] * 4
    assert jobs[5].overrides == {"matcher.name": "hungarian", "loss.cls": "rs"}
    assert jobs[5].dir == Path("R") / "matcher.name=hungarian__loss.cls=rs__seed=1"
    assert plan.variant_name({"data.root": "/a b/c*"}, 2) == "data.root=-a-b-c-__seed=2"
    long = plan.variant_name({"k": "v" * 400}, 0)
    assert len(long) <= 170 and long.endswith("__seed=0")
    with pytest.raises(ValueError, match="collide"):
        plan.expand({"k": ["a/b", "a:b"]}, [0], Path("R"))


def test_variant_major_order_is_the_same_runs_reordered() -> None:
    grid = plan.parse_grid(["matcher.name=hungarian,sinkhorn"])
    by_seed = plan.expand(grid, [2, 0], Path("R"))
    by_variant = plan.expand(grid, [2, 0], Path("R"), order="variant")
    assert [(j.overrides["matcher.name"], j.seed) for j in by_variant] == [
        ("hungarian", 2),
        ("hungarian", 0),
        ("sinkhorn", 2),
        ("sinkhorn", 0),
    ]
    assert [(j.overrides["matcher.name"], j.seed) for j in by_seed] == [
        ("hungarian", 2),
        ("sinkhorn", 2),
        ("hungarian", 0),
        ("sinkhorn", 0),
    ]
    assert sorted(j.name for j in by_seed) == sorted(j.name for j in by_variant)
    with pytest.raises(ValueError, match="order"):
        plan.expand(grid, [0], Path("R"), order="random")


def test_variants_are_one_grid_axis() -> None:
    grid = plan.parse_grid(["loss.cls=focal,rs"])
    variants = plan.parse_variants(
        ["matcher.name=hungarian", "matcher.name=gu 'matcher.gu.target=identity' matcher.gu.scale=0.05"], grid
    )
    assert variants == [
        {"matcher.name": "hungarian"},
        {"matcher.name": "gu", "matcher.gu.target": "identity", "matcher.gu.scale": "0.05"},
    ]
    jobs = plan.expand(grid, [3], Path("R"), variants)
    assert [j.overrides for j in jobs] == [
        {"matcher.name": "hungarian", "loss.cls": "focal"},
        {"matcher.name": "hungarian", "loss.cls": "rs"},
        {"matcher.name": "gu", "matcher.gu.target": "identity", "matcher.gu.scale": "0.05", "loss.cls": "focal"},
        {"matcher.name": "gu", "matcher.gu.target": "identity", "matcher.gu.scale": "0.05", "loss.cls": "rs"},
    ]
    assert jobs[2].name == "matcher.name=gu__matcher.gu.target=identity__matcher.gu.scale=0.05__loss.cls=focal__seed=3"
    for bad in (["loss.cls=ce"], ["seed=1"], ["a"], ["a="], ["a=1 a=2"], [""], ["a=1", "a=1"]):
        with pytest.raises(ValueError):
            plan.parse_variants(bad, grid)


def test_slots() -> None:
    p = cli.build_parser()

    def mk(*a: str) -> list[str | None]:
        args = p.parse_args(["--config", "c", "--out", "o", *a])
        return plan.make_slots(args.jobs, args.gpus, args.torchrun)

    assert mk() == [None]
    assert mk("--jobs", "3") == [None, None, None]
    assert mk("--gpus", "0,1") == ["0", "1"]
    assert mk("--gpus", "0,1,2,3", "--torchrun", "2") == ["0,1", "2,3"]
    with pytest.raises(ValueError):
        mk("--gpus", "0,1,2", "--torchrun", "2")


def test_dry_run_prints_commands_and_writes_nothing(env, capsys) -> None:
    rc = cli.main(
        base_args(
            env,
            "--grid",
            "matcher.name=hungarian,sinkhorn",
            "--seeds",
            "0",
            "1",
            "--torchrun",
            "2",
            "--extra",
            "train.epochs=2",
            "--device",
            "cpu",
            "--dry-run",
        )
    )
    assert rc == 0
    assert not Path(env["out"]).exists()
    out = capsys.readouterr().out
    name = "matcher.name=sinkhorn__seed=1"
    tb = str(Path(env["out"]) / "tb" / name)
    expected = (
        f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 {env['fake']} "
        f"--config {env['cfg']} --output-dir {Path(env['out']) / name} --no-progress --device cpu "
        f"train.epochs=2 matcher.name=sinkhorn seed=1 log.tb_dir={tb}"
    )
    assert expected in out
    assert "4 runs (2 variants x 2 seeds)" in out


def test_dry_run_with_variants(env, capsys) -> None:
    rc = cli.main(base_args(env, "--variant", "a=1 b=x", "--variant", "a=2", "--grid", "c=u,v", "--dry-run"))
    assert rc == 0
    out = capsys.readouterr().out
    assert " a=1 b=x c=v seed=0 " in out and " a=2 c=u seed=0 " in out
    assert "4 runs (4 variants x 1 seeds)" in out


def test_dry_run_variant_major_order(env, capsys) -> None:
    args = ["--variant", "a=1", "--variant", "a=2", "--seeds", "5", "6", "--dry-run"]
    assert cli.main(base_args(env, *args, "--order", "variant")) == 0
    names = [ln.split(": ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[dry-run] run:")]
    assert names == ["a=1__seed=5", "a=1__seed=6", "a=2__seed=5", "a=2__seed=6"]


def test_ablation_with_failure_then_skip(env, capsys) -> None:
    grid = ["--grid", "matcher.name=hungarian,broken,sinkhorn", "--seeds", "0", "1"]
    rc = cli.main(base_args(env, *grid, "--jobs", "2", "--reach", "0.5"))
    out = capsys.readouterr().out
    root = Path(env["out"])
    assert rc == 1  # a variant failed
    # the failure is reported with its return code and the tail of its log, the others completed
    assert "FAILED matcher.name=broken__seed=0: return code 3" in out
    assert "RuntimeError: boom in the broken matcher" in out
    summary = json.loads((root / "ablation.json").read_text())
    status = {
        v["name"]: (v["status"], v["returncode"], v["seed"], v["overrides"]) for v in summary["variants"]
    }
    assert status == {
        f"matcher.name={m}__seed={s}": (
            "failed" if m == "broken" else "finished",
            3 if m == "broken" else 0,
            s,
            {"matcher.name": m},
        )
        for m in ("hungarian", "broken", "sinkhorn")
        for s in (0, 1)
    }
    assert summary["grid"] == {"matcher.name": ["hungarian", "broken", "sinkhorn"]}
    assert summary["seeds"] == [0, 1]
    for v in summary["variants"]:
        d = Path(v["dir"])
        assert d == root / v["name"]
        ov = json.loads((d / "overrides.json").read_text())
        assert ov["overrides"] == v["overrides"] and ov["seed"] == v["seed"]
        (call,) = calls(d)
        assert call["argv"][:5] == ["--config", env["cfg"], "--output-dir", str(d), "--no-progress"]
        assert f"seed={v['seed']}" in call["argv"]
        assert f"log.tb_dir={root / 'tb' / v['name']}" in call["argv"]
        assert (d / "stdout.log").read_text().count("fake train starting") == 1
    # plots and tables, from the finished runs only
    for name in ("curves.png", "curves.svg", "loss.png", "table.md", "table.csv"):
        assert (root / name).is_file(), name
    with (root / "table.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"matcher.name=hungarian", "matcher.name=sinkhorn"}
    h, s = rows["matcher.name=hungarian"], rows["matcher.name=sinkhorn"]
    # fake AP = 0.1 (e+1) gain + 0.01 seed over epochs 0..2; seeds 0 and 1
    assert float(h["final_ap"]) == pytest.approx(0.305) and float(s["final_ap"]) == pytest.approx(0.605)
    assert (float(s["final_ap_min"]), float(s["final_ap_max"])) == (0.6, 0.61)
    assert (
        int(s["reach_epoch"]) == 2 and h["reach_epoch"] == ""
    )  # sinkhorn mean AP 0.205, 0.405, 0.605; hungarian < 0.5
    assert float(h["sec_per_epoch"]) == 2.0 and int(h["seeds"]) == 2

    # second invocation: finished runs are skipped (not re-launched), the broken one is tried again
    rc2 = cli.main(base_args(env, *grid))
    out2 = capsys.readouterr().out
    assert rc2 == 1
    summary2 = json.loads((root / "ablation.json").read_text())
    st2 = {v["name"]: v["status"] for v in summary2["variants"]}
    assert (
        st2["matcher.name=hungarian__seed=0"] == "skipped" and st2["matcher.name=broken__seed=1"] == "failed"
    )
    assert "skip matcher.name=sinkhorn__seed=1" in out2
    for m in ("hungarian", "sinkhorn"):
        assert len(calls(root / f"matcher.name={m}__seed=0")) == 1
    assert len(calls(root / "matcher.name=broken__seed=0")) == 2

    # without the broken variant everything is skipped and the exit code is 0
    assert cli.main(base_args(env, "--grid", "matcher.name=hungarian,sinkhorn", "--seeds", "0", "1")) == 0


def test_interrupted_run_is_resumed(env, capsys) -> None:
    args = base_args(
        env, "--grid", "matcher.name=hungarian", "--extra", "fake.crash_once_after=0", "--no-plots"
    )
    assert cli.main(args) == 1
    d = Path(env["out"]) / "matcher.name=hungarian__seed=0"
    assert not (d / "finished.json").exists() and len((d / "log.txt").read_text().splitlines()) == 1
    assert "simulated interruption" in capsys.readouterr().out
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "resume matcher.name=hungarian__seed=0" in out
    epochs = [json.loads(x)["epoch"] for x in (d / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2] and (d / "finished.json").is_file()
    assert len(calls(d)) == 2
    log = (d / "stdout.log").read_text()
    assert "launching:" in log and "resuming:" in log  # stdout.log is appended, not overwritten


def test_interrupted_runs_resume_before_new_ones(env, capsys) -> None:
    """A cut-short ablation completes the runs it had begun before it opens new ones (seed-major otherwise)."""
    one = base_args(env, "--grid", "matcher.name=hungarian", "--seeds", "1", "--no-plots",
                    "--extra", "fake.crash_once_after=0")
    assert cli.main(one) == 1  # seed 1 interrupted after its first epoch
    capsys.readouterr()
    both = base_args(env, "--grid", "matcher.name=hungarian,sinkhorn", "--seeds", "0", "1", "--no-plots")
    assert cli.main(both) == 0
    launches = [ln.split()[1:3] for ln in capsys.readouterr().out.splitlines()
                if ln.startswith(("[ablate] resume ", "[ablate] start "))]
    assert launches == [
        ["resume", "matcher.name=hungarian__seed=1"],
        ["start", "matcher.name=hungarian__seed=0"],
        ["start", "matcher.name=sinkhorn__seed=0"],
        ["start", "matcher.name=sinkhorn__seed=1"],
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_runs_and_resume_completes_them(env, signum: int) -> None:
    """A batch system's SIGTERM (or SIGINT, even where a background shell ignores it) stops the running
    variants, marks them interrupted and exits 128 + signal; the same command then resumes them."""
    args = base_args(env, "--grid", "matcher.name=hungarian,sinkhorn", "--jobs", "2", "--no-plots",
                     "--extra", "fake.sleep=1", "train.epochs=30")
    cmd = [sys.executable, str(ROOT / "tools" / "ablate.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    root = Path(env["out"])
    runs = [root / f"matcher.name={m}__seed=0" for m in ("hungarian", "sinkhorn")]
    deadline = time.monotonic() + 60
    while not all((d / "log.txt").is_file() for d in runs):  # both runs have finished an epoch
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signum)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 128 + signum, out
    assert "interrupted: stopping running variants" in out
    summary = json.loads((root / "ablation.json").read_text())
    assert {v["status"] for v in summary["variants"]} == {"interrupted"}
    lines = [len((d / "log.txt").read_text().splitlines()) for d in runs]
    time.sleep(1.5)  # the fake runs write an epoch a second: stopped ones write no more
    assert [len((d / "log.txt").read_text().splitlines()) for d in runs] == lines
    assert all(n < 30 for n in lines)
    resumed = base_args(env, "--grid", "matcher.name=hungarian,sinkhorn", "--jobs", "2", "--no-plots",
                        "--extra", "train.epochs=30")
    assert cli.main(resumed) == 0
    for d in runs:
        assert [json.loads(x)["epoch"] for x in (d / "log.txt").read_text().splitlines()] == list(range(30))


def test_gpus_and_progress(env, capsys) -> None:
    args = base_args(
        env,
        "--grid",
        "matcher.name=hungarian,sinkhorn",
        "--gpus",
        "3,5",
        "--extra",
        "fake.sleep=0.5",
        "--progress-interval",
        "0.2",
        "--no-plots",
    )
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    root = Path(env["out"])
    used = {calls(root / f"matcher.name={m}__seed=0")[0]["cuda"] for m in ("hungarian", "sinkhorn")}
    assert used == {"3", "5"}  # one run per GPU, both at once
    assert "on GPU 3" in out and "on GPU 5" in out
    # progress lines name the running variant, its epochs done (of train.epochs) and its current AP
    progress = [ln for ln in out.splitlines() if "running:" in ln]
    assert progress, out
    assert any("matcher.name=sinkhorn__seed=0 (epochs done " in ln and "/3, AP " in ln for ln in progress)


def test_bad_arguments(env) -> None:
    with pytest.raises(SystemExit):
        cli.main(base_args(env, "--grid", "a=1", "--extra", "a=2"))
    with pytest.raises(SystemExit):
        cli.main(base_args(env, "--variant", "b=1 a=1", "--extra", "a=2"))
    with pytest.raises(SystemExit):
        cli.main(base_args(env, "--variant", "a=1", "--grid", "a=2,3"))
    with pytest.raises(SystemExit):
        cli.main(base_args(env, "--grid", "a=1", "--jobs", "2", "--gpus", "0,1"))
    with pytest.raises(SystemExit):
        cli.main(["--config", env["cfg"], "--out", env["out"], "--train-script", "/nonexistent/train.py"])


@pytest.mark.slow
def test_real_ablation_end_to_end(tmp_path: Path, capsys) -> None:
    train = ROOT / "tools" / "train.py"
    config = ROOT / "configs" / "shapes.yaml"
    if not train.is_file() or not config.is_file():
        pytest.skip("tools/train.py or configs/shapes.yaml does not exist yet")
    try:
        from conftest import tiny_overrides

        from detr_ot.data.shapes import ensure_shapes_dataset
    except ImportError as e:
        pytest.skip(f"tiny shapes helpers not available: {e}")
    data = tmp_path / "shapes"
    ensure_shapes_dataset(data, num_train=16, num_val=8, seed=0, min_size=64, max_size=96, max_objects=3)
    # tiny model on a tiny dataset outside the repo; seed / output dir / TensorBoard are set by ablate itself
    set_by_ablate = ("seed", "output_dir", "train.epochs", "log.tensorboard")
    extra = [o for o in tiny_overrides(data, tmp_path / "unused") if o.split("=", 1)[0] not in set_by_ablate]
    out = tmp_path / "real"
    args = [
        "--config",
        str(config),
        "--out",
        str(out),
        "--grid",
        "train.epochs=1,2",
        "--seeds",
        "0",
        "--device",
        "cpu",
        "--progress-interval",
        "5",
        "--extra",
        *extra,
    ]
    rc = cli.main(args)
    out1 = capsys.readouterr().out
    assert rc == 0, out1
    summary = json.loads((out / "ablation.json").read_text())
    assert [v["status"] for v in summary["variants"]] == ["finished", "finished"]
    for v in summary["variants"]:
        d = Path(v["dir"])
        assert (d / "finished.json").is_file() and (d / "config.yaml").is_file()
        n = int(v["overrides"]["train.epochs"])
        recs = [json.loads(x) for x in (d / "log.txt").read_text().splitlines() if x.strip()]
        assert [r["epoch"] for r in recs] == list(range(n))
        assert len(recs[-1]["test_coco_eval_bbox"]) == 12
        assert any((out / "tb" / v["name"]).rglob("events.out.tfevents*")), "TensorBoard logs under ROOT/tb"
    for name in ("curves.png", "curves.svg", "loss.png", "table.md", "table.csv"):
        assert (out / name).is_file(), name
    with (out / "table.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"train.epochs=1", "train.epochs=2"}
    last = json.loads((out / "train.epochs=2__seed=0" / "log.txt").read_text().splitlines()[-1])
    assert float(rows["train.epochs=2"]["final_ap"]) == last["test_coco_eval_bbox"][0]
    # second invocation skips both finished runs
    assert cli.main(args) == 0
    summary2 = json.loads((out / "ablation.json").read_text())
    assert [v["status"] for v in summary2["variants"]] == ["skipped", "skipped"]
