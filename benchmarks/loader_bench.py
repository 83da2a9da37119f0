"""Training-loader throughput: reading preprocessed shards vs the original's decode-in-DataLoader way.

    python benchmarks/loader_bench.py [--clips 120]

Both run on one core in this process, in alternating rounds over the same WebVid-shaped clips
(596x336, 5-20 s): the original decodes 8 frames with decord inside ``Dataset.__getitem__`` and
normalises them; the shard loader reads the frames this project's job wrote (webdataset tars, 8 x
224 x 224 uint8) and normalises them the same way (``pipeline.model.clip_from_frames``). Prints
samples/s per core of both and the ratio; cached features are not involved (see train_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from preprocess_bench import build_corpus, one_core, original_dataloader  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.model import clip_from_frames  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402
from pipeline.shards import list_shards, read_shard  # noqa: E402
from preprocess.config import PreprocessConfig  # noqa: E402


@one_core
def shard_loader(shards: list[Path]) -> float:
    import torch

    torch.set_num_threads(1)
    n, t0 = 0, time.perf_counter()
    for path in shards:
        batch = []
        for s in read_shard(path):
            batch.append(s["frames"])
            if len(batch) == 8:
                clip_from_frames(np.stack(batch))
                n, batch = n + len(batch), []
        if batch:
            clip_from_frames(np.stack(batch))
            n += len(batch)
    return n / (time.perf_counter() - t0)


def main() -> None:
    import ray

    from preprocess.job import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=120)
    ap.add_argument("--distinct", type=int, default=40)
    args = ap.parse_args()
    annotations, videos, paths = build_corpus(args.distinct, args.clips)
    out = Path(tempfile.mkdtemp(prefix="loader_bench_")) / "shards"
    init_ray(None, 2, object_store_mb=200)
    values = {
        "annotations": str(annotations),
        "videos": str(videos),
        "output": str(out),
        "samples_per_shard": 20,
    }
    assert run(load_config(PreprocessConfig, values=values))["ok"] == args.clips
    ray.shutdown()
    shards = list_shards(out)
    rounds = 3
    orig, shard = [], []
    for r in range(rounds):
        orig.append(original_dataloader(paths[r::rounds]))
        shard.append(shard_loader(shards[r::rounds]))
    res = {
        "clips": args.clips,
        "original_dataloader_samples_per_s": float(np.median(orig)),
        "shard_loader_samples_per_s": float(np.median(shard)),
        "rounds": {"original": [round(x, 2) for x in orig], "shards": [round(x, 1) for x in shard]},
    }
    print(f"\nper-core samples/s, 8 frames at 224x224, normalised ({args.clips} WebVid-shaped clips):")
    print(f"  original: decode in DataLoader   {res['original_dataloader_samples_per_s']:8.2f}")
    print(
        f"  this project: read frame shards  {res['shard_loader_samples_per_s']:8.2f}   "
        f"{res['shard_loader_samples_per_s'] / res['original_dataloader_samples_per_s']:.1f}x"
    )
    print(json.dumps(res, indent=1))
    shutil.rmtree(out.parent)
    shutil.rmtree(annotations.parent)


if __name__ == "__main__":
    main()
