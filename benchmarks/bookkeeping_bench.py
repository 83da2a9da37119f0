"""Driver memory and bookkeeping speed of the preprocessing job against the number of input rows.

    python benchmarks/bookkeeping_bench.py [--rows 2000000] [--small 20000] [--workers 2]
    python benchmarks/bookkeeping_bench.py --panda [--rows 2000000] [--small 20000]   (issue 22)

Writes two WebVid-layout CSVs of the same shape (``videoid, contentUrl, duration, page_dir, name``,
realistic lengths) whose videos are all missing, so every row fails fast as ``missing_file`` and what
is measured is the bookkeeping alone: reading the annotations, planning shards, scheduling them, the
index parts and ``index.parquet``. Each is run as a user runs it (``python cli.py preprocess ...``,
default flags) and the driver process's peak RSS (``VmHWM``) and rows/s of the whole command are
printed side by side. The CSVs are cached under ``.cache/bookkeeping``.

``--panda``: a Panda-70M-layout CSV instead (``videoID,url,timestamp,caption,matching_score``, 18.7
segments per video as in the full training list, 70.7M / 3.78M), ``--rows`` counting segments, run with
``--dataset panda70m``; extrapolated to Panda-70M's 70.7M segments.
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

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "a",
    "man",
    "walks",
    "his",
    "dog",
    "on",
    "the",
    "beach",
    "at",
    "sunset",
    "aerial",
    "view",
    "of",
    "a",
    "city",
    "slow",
    "motion",
    "close",
    "up",
]


def write_csv(path: Path, rows: int) -> Path:
    """WebVid's columns and typical field lengths (a ~60-character caption, page_dir of 100 videos)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write("videoid,contentUrl,duration,page_dir,name\n")
        for i in range(rows):
            vid = 1_000_000_000 + i
            caption = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(10))
            page = f"{(i // 100) * 100 + 1:06d}_{(i // 100) * 100 + 100:06d}"
            f.write(
                f"{vid},https://ak.picdn.net/shutterstock/videos/{vid}/preview/stock-footage-{vid}.mp4,"
                f'PT00H00M{10 + i % 40:02d}S,{page},"{caption.capitalize()}, {i % 9} people."\n'
            )
    tmp.rename(path)
    return path


def write_panda_csv(path: Path, segments: int) -> Path:
    """Panda-70M's columns: per video a list of [start, end] pairs (H:MM:SS.mmm), one caption and one
    matching score per segment; 18 or 19 segments a video (70.7M / 3.78M), captions ~60 characters."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write("videoID,url,timestamp,caption,matching_score\n")
        done, v = 0, 0
        while done < segments:
            n = min(19 if v % 10 < 7 else 18, segments - done)
            vid = f"v{v:010d}"
            spans = [
                [f"0:{k // 6:02d}:{(k % 6) * 10:02d}.000", f"0:{k // 6:02d}:{(k % 6) * 10 + 9:02d}.500"]
                for k in range(n)
            ]
            caps = [
                " ".join(WORDS[(v * 7 + k + j) % len(WORDS)] for j in range(10)).capitalize()
                for k in range(n)
            ]
            scores = [round(0.4 + (k % 5) * 0.01, 2) for k in range(n)]
            f.write(f'{vid},https://www.youtube.com/watch?v={vid},"{spans}","{caps}","{scores}"\n')
            done, v = done + n, v + 1
    tmp.rename(path)
    return path


def peak_rss_mb(pid: int) -> float:
    """The process's high-water RSS (kernel-tracked, so no sample can miss the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_job(csv_path: Path, workers: int, dataset: str = "webvid") -> dict:
    work = Path(tempfile.mkdtemp(prefix="bookkeeping_"))
    (work / "videos").mkdir()
    cmd = [
        sys.executable,
        "cli.py",
        "preprocess",
        "--annotations",
        str(csv_path),
        "--videos",
        str(work / "videos"),
        "--output",
        str(work / "out"),
        "--workers",
        str(workers),
        "--dataset",
        dataset,
        "progress_every_s=30",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, peak_rss_mb(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.2)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{out[-3000:]}")
    summary = json.loads((work / "out" / "summary.json").read_text())
    expected = {"_config.json", "_parts", "index.parquet", "summary.json"}
    leftovers = sorted({p.name.split("-")[0] for p in (work / "out").iterdir() if p.name not in expected})
    shutil.rmtree(work)
    assert summary["failed"] == summary["total"], "every video is missing: every row must fail"
    return {
        "rows": summary["total"],
        "seconds": round(seconds, 2),
        "rows_per_s": round(summary["total"] / seconds, 1),
        "driver_peak_rss_mb": round(peak, 1),
        "timing": summary.get("timing"),
        "unexpected_in_output": leftovers,  # e.g. empty shard files or a _staging folder
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--panda", action="store_true", help="a Panda-70M segment list (--dataset panda70m)")
    args = ap.parse_args()
    cache = REPO / ".cache" / "bookkeeping"
    kind, write, target = ("panda", write_panda_csv, 70.7e6) if args.panda else ("webvid", write_csv, 10.7e6)
    dataset = "panda70m" if args.panda else "webvid"
    small = run_job(write(cache / f"{kind}_{args.small}.csv", args.small), args.workers, dataset)
    big = run_job(write(cache / f"{kind}_{args.rows}.csv", args.rows), args.workers, dataset)
    print(f"\nall-missing {dataset} input, --workers {args.workers}, whole command:")
    for r in (small, big):
        print(
            f"  {r['rows']:>10,} rows  {r['seconds']:8.1f} s  {r['rows_per_s']:>10,.0f} rows/s  "
            f"driver peak RSS {r['driver_peak_rss_mb']:7.1f} MB"
        )
    ratio = big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    per_row_kb = (
        (big["driver_peak_rss_mb"] - small["driver_peak_rss_mb"]) * 1024 / (big["rows"] - small["rows"])
    )
    print(f"  peak RSS ratio {ratio:.2f}x; growth {per_row_kb:.4f} KB/row")
    extrapolated = small["driver_peak_rss_mb"] + per_row_kb * (target - small["rows"]) / 1024
    print(f"  extrapolated to {target / 1e6:.1f}M rows: {extrapolated:.0f} MB")
    print(json.dumps({"small": small, "big": big}, indent=1))


if __name__ == "__main__":
    main()
