"""Training step time from cached features vs from raw frames: same model, same process, same batches.

    python benchmarks/train_bench.py [--preset tiny] [--batch 8] [--frames 8] [--steps 20]

The frozen encoder (ViT + image Q-Former) runs every step on frames and never on features; the
features are computed in-process with ``model.encode_frames`` (what the feature cache stores).
Prints samples/s and step time for both paths and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.model import VideoLLaMA, clip_from_frames, preset
from pipeline.prompts import caption_sample, collate, prepare_tokenizer
from pipeline.tiny import tiny_tokenizer
from train.engine import param_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_flush_denormal(True)  # Adam state of a random tiny model turns denormal: 20x slower CPU math
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = VideoLLaMA(cfg).to(device).train()
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    text = collate(
        [caption_sample(tok, f"a red box moves left number {i}") for i in range(args.batch)], tok.pad_token_id
    )
    text = {k: v.to(device) for k, v in text.items()}
    size = cfg.image_size
    frames = torch.randint(0, 256, (args.batch, args.frames, size, size, 3), dtype=torch.uint8, device=device)
    features = model.encode_frames(clip_from_frames(frames)).to(torch.float16)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)

    def step(kind: str) -> None:
        if kind == "frames":
            out = model(**text, clip=clip_from_frames(frames))
        else:
            out = model(**text, features=features.float())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for kind in ("features", "frames"):
        for _ in range(args.warmup):
            step(kind)
    # interleaved rounds, so a noisy neighbour or a clock change hits both paths alike
    times = {"features": 0.0, "frames": 0.0}
    for _ in range(args.steps):
        for kind in times:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(kind)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[kind] += time.perf_counter() - t0
    results = {k: v / args.steps for k, v in times.items()}
    for kind, dt in results.items():
        print(f"{kind:>8}: {dt * 1000:8.1f} ms/step  {args.batch / dt:8.1f} samples/s")
    print(
        f"preset {args.preset}, batch {args.batch}, {args.frames} frames at {size}px on {device}: "
        f"features are {results['frames'] / results['features']:.2f}x faster than frames"
    )


if __name__ == "__main__":
    main()
