"""Two levers for the demo's CPU trainings (issue 19), measured per training step at the tiny preset:

    python benchmarks/demo_levers_bench.py [--threads 1] [--rounds 3] [--steps 10]

* bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``, fp32 weights) against fp32, for a step of the
  tiny encoder (64 scenes), the tiny LLM (32 x 80 tokens) and stage 1 (16 clips of cached features),
  alternating in one process so the ratios hold on a loaded machine;
* torch's thread count: the same steps at 1 and 2 threads, with the CPU seconds they cost (an OpenMP
  thread that waits for work spins, so on a busy 2-core machine 2 threads can cost far more CPU);
* drawing the tiny encoder's 64 scenes of a step (``random_scenes``), beside the step it feeds.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
from torch import nn

from pipeline.model import FrozenEncoder, VideoLLaMA, clip_from_frames, frame_features, tiny
from standins.tiny_encoder import KINDS, TARGETS, TinyEncoderConfig, random_scenes
from standins.tiny_llm import build_llm

MCFG = tiny()


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def encoder_step(bf16: bool):
    """One tiny-encoder training step as standins.tiny_encoder.train_encoder takes it."""
    enc, head = FrozenEncoder(MCFG, seed=0), nn.Linear(MCFG.feature_dim, len(KINDS) + len(TARGETS))
    params = [*enc.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    images, kind, targets = random_scenes(
        64, MCFG.image_size, TinyEncoderConfig(output="x"), torch.Generator()
    )

    def step():
        with autocast(bf16):
            out = head(frame_features(enc, clip_from_frames(images[:, None]))[:, 0].mean(1)).float()
            loss = nn.functional.cross_entropy(out[:, : len(KINDS)], kind) + 10 * nn.functional.mse_loss(
                out[:, len(KINDS) :], targets
            )
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def llm_step(bf16: bool):
    model = build_llm(512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 512, (32, 80), generator=torch.Generator().manual_seed(0))

    def step():
        with autocast(bf16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def stage1_step(bf16: bool):
    torch.manual_seed(0)
    model = VideoLLaMA(tiny())
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3)
    feats = torch.randn(16, 8, MCFG.num_query_tokens, MCFG.feature_dim)
    ids = torch.randint(3, 900, (16, 45))
    video = torch.zeros_like(ids, dtype=torch.bool)
    video[:, 1:33] = True
    labels = ids.masked_fill(torch.arange(45) < 33, -100)

    def step():
        with autocast(bf16):
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                video_mask=video,
                labels=labels,
                features=feats,
            )
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    return step


def timed(make, bf16: bool, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step, after one warm-up step."""
    step = make(bf16)
    step()
    w, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - w) / steps, (time.process_time() - c) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the bf16 comparison")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    parts = [("tiny-encoder", encoder_step), ("tiny-llm", llm_step), ("stage-1", stage1_step)]
    torch.set_num_threads(args.threads)
    print(f"bf16 autocast vs fp32, {args.threads} thread(s), median of {args.rounds} alternating rounds:")
    for name, make in parts:
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for bf16 in (False, True):
                runs[bf16].append(timed(make, bf16, args.steps)[0])
        a, b = np.median(runs[False]), np.median(runs[True])
        print(
            f"  {name:13s} fp32 {a * 1e3:7.1f} ms  bf16 {b * 1e3:7.1f} ms  bf16/fp32 {b / a:.2f}", flush=True
        )
    cfg, gen = TinyEncoderConfig(output="x"), torch.Generator().manual_seed(0)
    draws = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            random_scenes(64, MCFG.image_size, cfg, gen)
        draws.append((time.perf_counter() - t) / args.steps)
    print(
        f"  tiny-encoder  drawing its 64 scenes: {np.median(draws) * 1e3:7.1f} ms per step (fp32 step above)"
    )
    print("fp32 at 1 vs 2 threads, wall and CPU seconds per step (alternating rounds):")
    for name, make in parts:
        runs = {1: [], 2: []}
        for _ in range(args.rounds):
            for t in (1, 2):
                torch.set_num_threads(t)
                runs[t].append(timed(make, False, args.steps))
        (w1, c1), (w2, c2) = (np.median(np.array(runs[t]), axis=0) for t in (1, 2))
        print(
            f"  {name:13s} 1 thread {w1 * 1e3:7.1f} ms (CPU {c1 * 1e3:7.1f})  2 threads {w2 * 1e3:7.1f} ms "
            f"(CPU {c2 * 1e3:7.1f})  wall 2/1 {w2 / w1:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
