"""Running an ablation: each job is a training subprocess in one of the execution slots; ``ROOT/ablation.json``
records every job's status as it changes. Finished runs (``finished.json``) are skipped; interrupted ones are
simply launched again, and the training script resumes from its checkpoint."""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from detr_ot.ablation.plan import Job
from detr_ot.plots import last_progress


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def tail(path: Path, n: int = 20) -> str:
    """Last ``n`` lines of a text file ('' if missing)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def has_started(run_dir: Path) -> bool:
    """Whether a run directory holds a run to resume (a log or a checkpoint)."""
    return (run_dir / "log.txt").is_file() or (run_dir / "checkpoint.pth").is_file()


def _total_epochs(run_dir: Path) -> int | None:
    """train.epochs from the run's resolved config.yaml, if readable."""
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return int(cfg["train"]["epochs"])
    except Exception:  # noqa: BLE001 - progress display only
        return None


def _describe(job: Job) -> str:
    epoch, ap = last_progress(job.dir)
    job.last_epoch, job.last_ap = epoch, ap
    if epoch is None:
        return f"{job.name} (starting)"
    total = _total_epochs(job.dir)
    done = f"{epoch + 1}/{total}" if total else f"{epoch + 1}"
    ap_s = f", AP {ap:.3f}" if ap is not None else ""
    return f"{job.name} (epochs done {done}{ap_s})"


class Scheduler:
    """Runs the jobs (their ``command`` set) over the execution ``slots`` and keeps ROOT/ablation.json up to
    date. ``meta`` heads the summary and must hold the ablation's ``config`` and ``extra`` (recorded in each
    run's overrides.json). Without GPU slots, each run gets ``OMP_NUM_THREADS = cores / slots`` unless the
    environment sets it. ``progress_interval``: seconds between progress lines; ``poll``: seconds between
    checks of the running processes."""

    def __init__(
        self,
        jobs: list[Job],
        slots: list[str | None],
        meta: dict[str, Any],
        root: Path,
        progress_interval: float = 30.0,
        poll: float = 0.5,
    ) -> None:
        self.jobs, self.slots, self.meta, self.root = jobs, slots, meta, root
        self.progress_interval, self.poll = progress_interval, poll
        self.summary_path = root / "ablation.json"

    def write_summary(self) -> None:
        _atomic_json(
            self.summary_path, {**self.meta, "updated": now(), "variants": [j.record() for j in self.jobs]}
        )

    def _counts(self) -> str:
        c = {s: sum(j.status == s for j in self.jobs) for s in ("finished", "failed", "skipped", "pending")}
        done = c["finished"] + c["failed"] + c["skipped"]
        return (
            f"{done}/{len(self.jobs)} done (finished {c['finished']}, failed {c['failed']}, "
            f"skipped {c['skipped']}), {c['pending']} pending"
        )

    def _launch(self, job: Job, gpus: str | None) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        job.dir.mkdir(parents=True, exist_ok=True)
        ov_path = job.dir / "overrides.json"
        ov = {
            "name": job.name,
            "overrides": job.overrides,
            "seed": job.seed,
            "extra": self.meta["extra"],
            "config": self.meta["config"],
        }
        if ov_path.is_file():
            try:
                old = json.loads(ov_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
            if isinstance(old, dict) and any(old.get(k) != ov[k] for k in ("extra", "config")):
                print(f"[ablate] warning: {job.name}: resuming with a different config/--extra than before")
        _atomic_json(ov_path, ov)
        resuming = has_started(job.dir)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        elif "OMP_NUM_THREADS" not in os.environ:
            # N concurrent CPU runs share the cores instead of each spinning up one thread per core
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.slots)))
        log = (job.dir / "stdout.log").open("ab")
        log.write(f"=== {now()} {'resuming' if resuming else 'launching'}: {' '.join(job.command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        job.status, job.gpus, job.started, job.returncode = "running", gpus, now(), None
        job.ended = job.duration_s = job.note = None
        where = f" on GPU {gpus}" if gpus is not None else ""
        print(f"[ablate] {'resume' if resuming else 'start'} {job.name}{where} (pid {proc.pid})", flush=True)
        return proc, log

    def _finish(self, job: Job, rc: int, t0: float) -> None:
        job.returncode, job.ended, job.duration_s = rc, now(), round(time.monotonic() - t0, 3)
        job.last_epoch, job.last_ap = last_progress(job.dir)
        if rc == 0 and (job.dir / "finished.json").is_file():
            job.status = "finished"
            ap = f", AP {job.last_ap:.3f}" if job.last_ap is not None else ""
            print(f"[ablate] finished {job.name} in {job.duration_s:.0f}s{ap}", flush=True)
            return
        job.status = "failed"
        if rc == 0:
            job.note = "exited with code 0 but wrote no finished.json"
        print(f"[ablate] FAILED {job.name}: return code {rc}" + (f" ({job.note})" if job.note else ""))
        print(f"[ablate] --- tail of {job.dir / 'stdout.log'} ---")
        print(tail(job.dir / "stdout.log"))
        print("[ablate] ---", flush=True)

    def run(self) -> int:
        """Run every pending job, interrupted ones first; 0 if all finished or were skipped, 1 if any failed,
        130 on Ctrl-C / SIGINT and 143 on SIGTERM (a batch system's stop or time limit): the running jobs are
        stopped and marked interrupted, and running the same ablation again resumes them."""
        with _stop_on_signals() as received:
            try:
                return self._run()
            except KeyboardInterrupt:
                return 128 + received.get("signum", signal.SIGINT)

    def _run(self) -> int:
        for job in self.jobs:
            if (job.dir / "finished.json").is_file():
                job.status = "skipped"
                job.last_epoch, job.last_ap = last_progress(job.dir)
                print(f"[ablate] skip {job.name} (finished.json present)")
        self.write_summary()
        # interrupted runs first (in plan order), then the runs not started yet: an ablation cut short
        # completes the runs it had begun before it opens new ones
        waiting = [j for j in self.jobs if j.status == "pending"]
        pending = deque(sorted(waiting, key=lambda j: not has_started(j.dir)))
        running: dict[int, tuple[Job, subprocess.Popen[bytes], IO[bytes], float]] = {}
        last_report = time.monotonic()
        try:
            while pending or running:
                for slot, gpus in enumerate(self.slots):
                    if slot not in running and pending:
                        job = pending.popleft()
                        proc, log = self._launch(job, gpus)
                        running[slot] = (job, proc, log, time.monotonic())
                        self.write_summary()
                for slot, (job, proc, log, t0) in list(running.items()):
                    rc = proc.poll()
                    if rc is not None:
                        log.close()
                        del running[slot]
                        self._finish(job, rc, t0)
                        self.write_summary()
                if running and time.monotonic() - last_report >= self.progress_interval:
                    last_report = time.monotonic()
                    stamp = _dt.datetime.now().strftime("%H:%M:%S")
                    print(
                        f"[ablate {stamp}] {self._counts()}; running: "
                        + "; ".join(_describe(j) for j, *_ in running.values()),
                        flush=True,
                    )
                    self.write_summary()
                if running:
                    time.sleep(self.poll)
        except KeyboardInterrupt:
            print("[ablate] interrupted: stopping running variants (re-run the same command to resume)")
            for job, proc, log, _ in running.values():
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
                job.status, job.returncode, job.ended = "interrupted", proc.returncode, now()
            self.write_summary()
            raise
        self.write_summary()
        print(f"[ablate] {self._counts()}")
        return 1 if any(j.status == "failed" for j in self.jobs) else 0


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the scheduler loop (recording which one arrived), also
    where the shell started the ablation in the background with SIGINT ignored; handlers restored on exit.
    Outside the main thread (where Python allows no handlers) nothing is installed."""
    received: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum: int, _frame: Any) -> None:
        if "signum" in received:  # a second signal while the running jobs are being stopped: let them stop
            return
        received["signum"] = signum
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
