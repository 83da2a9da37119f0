"""The preprocessing command as a user runs it: clips/s with 1 and 2 workers vs the raw decord loop.

    python benchmarks/command_bench.py [--clips 300] [--distinct 40] [--repeats 1] [--cpu-by-role]

Unlike ``preprocess_bench.py`` (which times ``run()`` on an already started cluster) this times the
whole ``python cli.py preprocess --workers N`` process with default flags (256 samples per shard,
8 frames at 224x224): interpreter start, imports, Ray start, planning, executor start, decoding,
index write and shutdown. The raw decord loop (one core) runs in rounds before, between and after
the jobs so background load hits both alike. Each job's start-up breakdown (``summary.json``'s
``timing``) is printed too, and the rate of the work phase alone (``summary.json``'s ``clips_per_s``:
from the start of the Ray Data execution to its last result), which separates the per-job fixed cost
from the rate a longer job approaches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_bench import REPO, build_corpus, raw_decord  # noqa: E402

ROLES = [  # (role, what its command line contains), first match wins
    ("decoder children (decord)", "-m pipeline.video"),
    ("driver (cli.py preprocess)", "cli.py preprocess"),
    ("Ray workers running units", "ray::IDLE"),
    ("Ray workers running units", "ray::FlatMap"),
    ("Ray Data's actors (stats, autoscaling)", "ray::_StatsActor"),
    ("Ray Data's actors (stats, autoscaling)", "ray::_AutoscalingCoordinatorActor"),
    ("the job's progress actor", "ray::_Tracker"),
    ("Ray daemons (GCS, raylet, dashboard, agents, monitors)", ""),
]


def cpu_by_role(proc: subprocess.Popen, every_s: float = 0.2) -> dict[str, float]:
    """CPU seconds (user + system) of the command and all its descendants, by role, sampled until it
    exits (a process's last sample is within ``every_s`` of its end)."""
    import psutil

    root, last = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in family:
            try:
                with p.oneshot():
                    line, t = " ".join(p.cmdline()), p.cpu_times()
                last[p.pid] = (line, t.user + t.system)
            except psutil.Error:
                pass
        time.sleep(every_s)
    out: dict[str, float] = {}
    for line, seconds in last.values():
        role = next(r for r, key in ROLES if key in line)
        out[role] = out.get(role, 0.0) + seconds
    return out


def whole_command(annotations: Path, videos: Path, workers: int, clips: int, by_role: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_cmd_")) / "shards"
    cmd = [sys.executable, "cli.py", "preprocess", "--annotations", str(annotations), "--videos", str(videos)]
    cmd += ["--output", str(out), "--workers", str(workers), "--limit", str(clips)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu = cpu_by_role(proc) if by_role else {}
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out.parent)
    assert summary["ok"] == clips, summary["failures"]
    return {
        "seconds": seconds,
        "clips_per_s": clips / seconds,
        "work_clips_per_s": summary["clips_per_s"],  # from the first unit's submission to the last result
        "timing": summary.get("timing"),
        "cpu_by_role": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=300)
    ap.add_argument("--distinct", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each job (the median is reported)")
    ap.add_argument(
        "--cpu-by-role",
        action="store_true",
        help="also sample every process of each job (psutil, every 0.2 s) and print CPU seconds by role",
    )
    args = ap.parse_args()
    annotations, videos, paths = build_corpus(args.distinct, args.clips)
    raw_decord(paths[:10])  # warm the page cache
    chunk = paths[: max(40, args.clips // 3)]
    raws, one, two = [raw_decord(chunk)], [], []
    for _ in range(args.repeats):
        one.append(whole_command(annotations, videos, 1, args.clips, args.cpu_by_role))
        raws.append(raw_decord(chunk))
        two.append(whole_command(annotations, videos, 2, args.clips, args.cpu_by_role))
        raws.append(raw_decord(chunk))
    raw = float(np.median(raws))
    r1 = float(np.median([x["clips_per_s"] for x in one]))
    r2 = float(np.median([x["clips_per_s"] for x in two]))
    w1 = float(np.median([x["work_clips_per_s"] for x in one]))
    w2 = float(np.median([x["work_clips_per_s"] for x in two]))
    load = os.getloadavg()
    print(f"\nwhole `cli.py preprocess` command, {args.clips} WebVid-shaped clips, default flags:")
    print(f"  raw decord loop, 1 core        {raw:6.2f} clips/s   rounds {[round(x, 2) for x in raws]}")
    print(f"  command, --workers 1           {r1:6.2f} clips/s   {r1 / raw:.2f} of raw")
    print(f"  command, --workers 2           {r2:6.2f} clips/s   {r2 / r1:.2f}x of 1 worker")
    print(
        f"  work phase only (no interpreter, Ray start or shutdown): 1 worker {w1:.2f} clips/s "
        f"({w1 / raw:.2f} of raw), 2 workers {w2:.2f} ({w2 / w1:.2f}x of 1)"
    )
    print(f"  load average after (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name, runs in (("1 worker", one), ("2 workers", two)):
        print(f"  {name}: " + "; ".join(f"{x['seconds']:.1f} s {json.dumps(x['timing'])}" for x in runs))
    if args.cpu_by_role:
        cores = len(os.sched_getaffinity(0))
        for name, runs in (("1 worker", one), ("2 workers", two)):
            x = runs[-1]
            total = sum(x["cpu_by_role"].values())
            print(f"\n  CPU seconds by role, {name} ({x['seconds']:.1f} s wall on {cores} cores):")
            for role, cpu_s in sorted(x["cpu_by_role"].items(), key=lambda kv: -kv[1]):
                print(f"    {cpu_s:6.1f}  {role}")
            print(
                f"    {total:6.1f}  in all: at least {total / cores:.1f} s of wall time on {cores} busy cores"
            )
    shutil.rmtree(annotations.parent)


if __name__ == "__main__":
    main()
