"""Decode cost of a segment of a long video against the same seconds as a file of their own (issue 22).

    python benchmarks/segment_bench.py [--minutes 10] [--repeats 15] [--size 224]

Makes a 10-minute H.264 video (25 fps, GOP 50, 596x336 like WebVid's previews) and a file holding only
its seconds 300-310 (same frames, same encoder settings), then times ``decode_clip`` (open, index, 8
uniform frames, resize) on the segment ``start=300, end=310`` of the long file and on the short file,
alternating, in this one process. Prints the median of each and their ratio (target <= 1.5x). The
videos are cached under ``.cache/segment_bench``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.video import SamplingSpec, decode_clip  # noqa: E402
from standins.sample_data import clip_frames, write_clip  # noqa: E402

FPS, W, H, START, SECONDS = 25, 596, 336, 300, 10


def videos(minutes: int) -> tuple[Path, Path]:
    root = REPO / ".cache" / "segment_bench"
    root.mkdir(parents=True, exist_ok=True)
    long, short = root / f"long_{minutes}min.mp4", root / "part_300_310.mp4"
    if not long.exists():
        print(f"making a {minutes}-minute video (once) ...", flush=True)
        write_clip(long, minutes * 60, fps=FPS, width=W, height=H, seed=5)
    if not short.exists():
        offset = START * FPS  # the long video's frames 7500.. as a file of their own

        def render(start: int, n: int):
            return clip_frames(n, W, H, 5, offset + start)

        write_clip(short, SECONDS, fps=FPS, width=W, height=H, render=render)
    return long, short


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    long, short = videos(args.minutes)
    spec = SamplingSpec(size=args.size, min_frames=8)
    sources = {
        "segment of the long file": {"path": str(long), "start": float(START), "end": float(START + SECONDS)},
        "the same 10 s as a file": {"path": str(short)},
    }
    times: dict[str, list[float]] = {k: [] for k in sources}
    for src in sources.values():  # warm the page cache and the imports
        decode_clip(src, spec, [0, 0])
    for r in range(args.repeats):
        for k, src in sources.items():
            t0 = time.perf_counter()
            out = decode_clip(src, spec, [0, r])
            times[k].append(time.perf_counter() - t0)
    seg = decode_clip(sources["segment of the long file"], spec, [0, 0])
    own = decode_clip(sources["the same 10 s as a file"], spec, [0, 0])
    print(f"{args.minutes}-minute H.264 ({W}x{H}, {FPS} fps, GOP 50), 8 uniform frames at {args.size} px:")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:28s} median {med[k] * 1000:7.1f} ms  (min {min(v) * 1000:.1f}, n={len(v)})")
    seg_k, file_k = "segment of the long file", "the same 10 s as a file"
    print(
        f"  ratio segment / file: {med[seg_k] / med[file_k]:.2f}x of medians, {min(times[seg_k]) / min(times[file_k]):.2f}x of minima"
    )
    print(f"  segment timestamps {seg['timestamps']}")
    print(f"  file timestamps    {own['timestamps']} (+{START} s in the source)")
    del out


if __name__ == "__main__":
    main()
