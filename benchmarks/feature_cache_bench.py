"""Feature-cache stage: encoder throughput and bytes per sample.

    python benchmarks/feature_cache_bench.py [--preset tiny] [--clips 64] [--batch 8] [--real-size]

Prints, in one process:
  * clips/s of the frozen encoder (ViT + ln_vision + image Q-Former) alone, for ``--preset`` on this
    machine's device, 8 frames per clip;
  * clips/s of the whole preprocessing job over the same synthetic corpus without and with
    ``--cache-features`` (ratio = what the cache stage costs on top of decoding);
  * bytes per sample on disk: frames, features (fp16) and both, measured from the written shards, and
    the real-size feature payload ([8, 32, 768] fp16 as .npy);
  * with ``--real-size``: seconds per clip of the real ViT-g + Q-Former (random weights) on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.config import load_config  # noqa: E402
from pipeline.model import FrozenEncoder, clip_from_frames, preset  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402
from pipeline.shards import _npy_bytes, list_shards  # noqa: E402
from preprocess.config import PreprocessConfig  # noqa: E402
from standins.sample_data import make_webvid_sample  # noqa: E402


def encoder_rate(name: str, clips: int, batch: int, device: str) -> float:
    cfg = preset(name)
    enc = FrozenEncoder(cfg).to(device)
    frames = np.random.default_rng(0).integers(
        0, 255, (batch, 8, cfg.image_size, cfg.image_size, 3), np.uint8
    )
    clip = clip_from_frames(frames).to(device)
    enc(clip[:1])  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < clips:
        with torch.autocast(device, enabled=device == "cuda"):
            enc(clip)
        done += batch
    if device == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def member_bytes(folder: Path) -> dict[str, float]:
    """Mean bytes per sample of each payload kind, from the tar members."""
    sizes: dict[str, list[int]] = {}
    for shard in list_shards(folder):
        with tarfile.open(shard) as tar:
            for m in tar:
                kind = m.name.split(".", 1)[1]
                sizes.setdefault(kind, []).append(m.size)
    return {k: float(np.mean(v)) for k, v in sizes.items()}


def job_rate(corpus: dict, out: Path, cache: bool, workers: int) -> tuple[float, dict]:
    import ray

    from preprocess.job import run

    values = {**corpus, "output": str(out), "size": preset("tiny").image_size, "samples_per_shard": 8}
    if cache:
        values.update({"features.enabled": True, "features.model": "tiny", "features.batch_size": 8})
    cfg = load_config(PreprocessConfig, values=values)
    init_ray(None, workers, object_store_mb=200)
    t0 = time.perf_counter()
    summary = run(cfg)
    elapsed = time.perf_counter() - t0
    ray.shutdown()
    return summary["total"] / elapsed, member_bytes(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--real-size", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": device, "torch_threads": torch.get_num_threads()}
    res["encoder_clips_per_s"] = encoder_rate(args.preset, args.clips, args.batch, device)

    tmp = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    corpus = make_webvid_sample(tmp / "webvid", 16, seed=5, seconds=(5.0, 10.0))
    plain, frame_bytes = job_rate(corpus, tmp / "plain", False, 2)
    cached, cache_bytes = job_rate(corpus, tmp / "cached", True, 2)
    shutil.rmtree(tmp)
    res.update(job_clips_per_s_frames_only=plain, job_clips_per_s_with_cache=cached)
    res["bytes_per_sample_tiny"] = cache_bytes
    res["bytes_real_size_features_npy"] = len(_npy_bytes(np.zeros((8, 32, 768), np.float16)))
    res["bytes_224px_frames_npy"] = len(_npy_bytes(np.zeros((8, 224, 224, 3), np.uint8)))
    if args.real_size:
        enc = FrozenEncoder(preset("vit-g-7b")).to(device)
        if device == "cpu":
            enc = enc.float()  # fp16 matmuls are not a CPU path
        clip = clip_from_frames(np.zeros((1, 8, 224, 224, 3), np.uint8)).to(device)
        enc(clip)
        t0 = time.perf_counter()
        enc(clip)
        res["real_size_seconds_per_clip"] = time.perf_counter() - t0

    print(f"\nfeature cache on {device} ({res['torch_threads']} torch threads):")
    print(
        f"  {args.preset} encoder alone: {res['encoder_clips_per_s']:.1f} clips/s (8 frames, batch {args.batch})"
    )
    print(
        f"  job, 2 workers, 16 clips: frames only {plain:.2f} clips/s, with cache {cached:.2f} clips/s "
        f"({cached / plain:.2f}x)"
    )
    print(f"  bytes/sample (tiny, 56 px): {json.dumps({k: round(v) for k, v in cache_bytes.items()})}")
    print(
        f"  real size: features {res['bytes_real_size_features_npy']} B vs 224 px frames "
        f"{res['bytes_224px_frames_npy']} B per sample "
        f"({res['bytes_224px_frames_npy'] / res['bytes_real_size_features_npy']:.1f}x smaller)"
    )
    if args.real_size:
        print(f"  real ViT-g + Q-Former, random weights: {res['real_size_seconds_per_clip']:.2f} s/clip")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
