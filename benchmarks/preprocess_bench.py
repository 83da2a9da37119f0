"""Preprocessing throughput and memory, measured side by side in one process.

    python benchmarks/preprocess_bench.py [--clips 200] [--distinct 40] [--soak 1000]

Prints clips/s per core for
  (a) a raw decord loop over the clips (the ceiling: open at 224x224, 8 uniform frames, nothing else),
  (b) the original Video-LLaMA way: decord inside a torch DataLoader ``__getitem__`` (per sample:
      open, sample, decode, permute to [C,T,H,W] float, CLIP-normalise), one core,
  (c) this project's Ray Data job with 1 and with 2 workers (time of ``run()`` on a started cluster;
      Ray's start-up, paid once per job, is printed separately),
then RSS of the job's processes over a soak run of ``--soak`` clips. WebVid-shaped clips (596x336,
5-20 s, 25 fps, ~1 Mbit/s H.264) are made once and cached under ``.cache/bench_corpus``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.config import load_config  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402
from preprocess.config import PreprocessConfig  # noqa: E402
from standins.sample_data import make_webvid_sample  # noqa: E402

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def build_corpus(distinct: int, rows: int) -> tuple[Path, Path, list[Path]]:
    """``distinct`` real clips, hard-linked under ``rows`` videoids (page cache treats all ways alike)."""
    src = REPO / ".cache" / "bench_corpus" / f"distinct{distinct}"
    if not (src / "annotations" / "0.csv").exists():
        print(f"making {distinct} WebVid-shaped clips in {src} (once) ...", flush=True)
        make_webvid_sample(src, distinct, seed=123)
    with open(src / "annotations" / "0.csv") as f:
        base = list(csv.DictReader(f))
    root = Path(tempfile.mkdtemp(prefix="bench_rows_"))
    (root / "annotations").mkdir()
    paths = []
    with open(root / "annotations" / "0.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(base[0]))
        w.writeheader()
        for i in range(rows):
            b = base[i % distinct]
            page = f"p{i // 100:04d}"
            dst = root / "videos" / page / f"{i:08d}.mp4"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src / "videos" / b["page_dir"] / f"{b['videoid']}.mp4", dst)
            w.writerow({**b, "videoid": f"{i:08d}", "page_dir": page})
            paths.append(dst)
    return root / "annotations", root / "videos", paths


def one_core(fn):
    """Pin the in-process baselines to one core: decord and torch would otherwise use every core."""

    def wrapped(*a, **kw):
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(before)})
        try:
            return fn(*a, **kw)
        finally:
            os.sched_setaffinity(0, before)

    return wrapped


@one_core
def raw_decord(paths: list[Path]) -> float:
    import decord

    t0 = time.perf_counter()
    for p in paths:
        vr = decord.VideoReader(str(p), width=224, height=224, num_threads=1)
        n = len(vr)
        vr.get_batch([int(i * n / 8) for i in range(8)]).asnumpy()
    return len(paths) / (time.perf_counter() - t0)


@one_core
def original_dataloader(paths: list[Path]) -> float:
    import decord
    import torch

    decord.bridge.set_bridge("torch")

    class WebvidLike(torch.utils.data.Dataset):  # the original's load_video + transform, per sample
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            vr = decord.VideoReader(str(paths[i]), height=224, width=224)
            n = len(vr)
            frames = vr.get_batch(list(np.arange(0, n, n / 8).astype(int))).permute(3, 0, 1, 2).float()
            frames = frames / 255.0
            return (frames - torch.tensor(MEAN)[:, None, None, None]) / torch.tensor(STD)[:, None, None, None]

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(WebvidLike(), batch_size=8, num_workers=0)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    decord.bridge.set_bridge("native")
    return len(paths) / (time.perf_counter() - t0)


def job(
    annotations: Path,
    videos: Path,
    workers: int,
    limit: int | None = None,
    sample_rss: bool = False,
    per_shard: int = 25,
):
    import ray

    from preprocess.job import run

    out = Path(tempfile.mkdtemp(prefix="bench_out_")) / "shards"
    t0 = time.perf_counter()
    init_ray(None, workers, object_store_mb=200)
    startup = time.perf_counter() - t0
    rss: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sampler():
        me = psutil.Process()
        while not stop.wait(1.0):
            worker, decoder = 0.0, 0.0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "pipeline.video" in cmd:
                    decoder += p.info["memory_info"].rss
                elif "ray::" in cmd or "default_worker" in cmd:
                    worker += p.info["memory_info"].rss
            rss.append((time.perf_counter() - t0, worker / 2**20, decoder / 2**20))
        del me

    th = threading.Thread(target=sampler, daemon=True)
    if sample_rss:
        th.start()
    cfg = load_config(
        PreprocessConfig,
        values={
            "annotations": str(annotations),
            "videos": str(videos),
            "output": str(out),
            "samples_per_shard": per_shard,
            "limit": limit,
            "progress_every_s": 30.0,
        },
    )
    t1 = time.perf_counter()
    summary = run(cfg)
    elapsed = time.perf_counter() - t1
    stop.set()
    ray.shutdown()
    shutil.rmtree(out.parent)
    assert summary["ok"] == summary["total"], summary["failures"]
    return summary["total"] / elapsed, startup, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--distinct", type=int, default=40)
    ap.add_argument("--soak", type=int, default=1000, help="clips in the RSS soak run (0: skip)")
    ap.add_argument("--samples-per-shard", type=int, default=25)
    args = ap.parse_args()
    annotations, videos, paths = build_corpus(args.distinct, max(args.clips, args.soak))
    sub = paths[: args.clips]
    raw_decord(sub[:10])  # warm the page cache for everyone
    results = {"clips": args.clips, "cpu_count": os.cpu_count()}
    # the two in-process baselines alternate in rounds so that any background load hits both alike
    rounds = 4
    chunks = [sub[i::rounds] for i in range(rounds)]
    raws, origs = [], []
    for chunk in chunks:
        raws.append(raw_decord(chunk))
        origs.append(original_dataloader(chunk))
    r1, s1, _ = job(annotations, videos, 1, limit=args.clips, per_shard=args.samples_per_shard)
    r2, s2, _ = job(annotations, videos, 2, limit=args.clips, per_shard=args.samples_per_shard)
    raws.append(raw_decord(chunks[0]))  # drift check: the ceiling again, after the jobs
    results.update(
        raw_decord_clips_per_s=float(np.median(raws)),
        raw_decord_rounds=[round(x, 2) for x in raws],
        original_dataloader_clips_per_s=float(np.median(origs)),
        original_dataloader_rounds=[round(x, 2) for x in origs],
        job_1_worker_clips_per_s=r1,
        job_2_workers_clips_per_s=r2,
        ray_startup_s=round((s1 + s2) / 2, 2),
    )
    raw = results["raw_decord_clips_per_s"]
    print(f"\nper-core clips/s over {args.clips} WebVid-shaped clips (596x336, 8 frames -> 224x224):")
    print(f"  raw decord loop (ceiling)        {raw:7.2f}   1.00x")
    print(
        f"  original DataLoader way          {results['original_dataloader_clips_per_s']:7.2f}   "
        f"{results['original_dataloader_clips_per_s'] / raw:.2f}x"
    )
    print(f"  this job, 1 Ray worker           {r1:7.2f}   {r1 / raw:.2f}x of raw")
    print(f"  this job, 2 Ray workers (total)  {r2:7.2f}   {r2 / r1:.2f}x of 1 worker")
    print(f"  Ray start-up (once per job)      {results['ray_startup_s']:.1f} s")
    if args.soak:
        rate, _, rss = job(annotations, videos, 2, limit=args.soak, sample_rss=True)
        w = [x[1] for x in rss]
        d = [x[2] for x in rss]
        q = max(1, len(rss) // 4)
        results["soak"] = {
            "clips": args.soak,
            "clips_per_s": rate,
            "samples": len(rss),
            "worker_rss_mb_first_quarter": float(np.mean(w[:q])),
            "worker_rss_mb_last_quarter": float(np.mean(w[-q:])),
            "worker_rss_mb_max": max(w),
            "decoder_rss_mb_first_quarter": float(np.mean(d[:q])),
            "decoder_rss_mb_last_quarter": float(np.mean(d[-q:])),
            "decoder_rss_mb_max": max(d),
        }
        s = results["soak"]
        print(f"\nRSS over a {args.soak}-clip run, 2 workers ({rate:.1f} clips/s, sampled every 1 s):")
        print(
            f"  Ray workers total: first quarter {s['worker_rss_mb_first_quarter']:.0f} MB, last quarter "
            f"{s['worker_rss_mb_last_quarter']:.0f} MB, max {s['worker_rss_mb_max']:.0f} MB"
        )
        print(
            f"  decoders total:    first quarter {s['decoder_rss_mb_first_quarter']:.0f} MB, last quarter "
            f"{s['decoder_rss_mb_last_quarter']:.0f} MB, max {s['decoder_rss_mb_max']:.0f} MB"
        )
    shutil.rmtree(annotations.parent)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
