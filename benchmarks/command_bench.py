"""The preprocessing command as a user runs it: clips/s with 1 and 2 workers vs the raw decord loop.

    python benchmarks/command_bench.py [--clips 300] [--distinct 40] [--repeats 1]

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


def whole_command(annotations: Path, videos: Path, workers: int, clips: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_cmd_")) / "shards"
    cmd = [sys.executable, "cli.py", "preprocess", "--annotations", str(annotations), "--videos", str(videos)]
    cmd += ["--output", str(out), "--workers", str(workers), "--limit", str(clips)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out.parent)
    assert summary["ok"] == clips, summary["failures"]
    return {
        "seconds": seconds,
        "clips_per_s": clips / seconds,
        "work_clips_per_s": summary["clips_per_s"],  # from the first unit's submission to the last result
        "timing": summary.get("timing"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=300)
    ap.add_argument("--distinct", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each job (the median is reported)")
    args = ap.parse_args()
    annotations, videos, paths = build_corpus(args.distinct, args.clips)
    raw_decord(paths[:10])  # warm the page cache
    chunk = paths[: max(40, args.clips // 3)]
    raws, one, two = [raw_decord(chunk)], [], []
    for _ in range(args.repeats):
        one.append(whole_command(annotations, videos, 1, args.clips))
        raws.append(raw_decord(chunk))
        two.append(whole_command(annotations, videos, 2, args.clips))
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
    shutil.rmtree(annotations.parent)


if __name__ == "__main__":
    main()
