"""Real-size throughput on one GPU, random weights of the real sizes: ready before a GPU is lent.

    python benchmarks/gpu_bench.py                     # one CUDA GPU: vit-g-7b preset, < 8 minutes
    python benchmarks/gpu_bench.py --preset tiny       # CPU: the same code at the tiny preset (CI)

Prints, all in one process on the same model:

* feature cache: clips/s of the frozen ViT-g (fp16) + image Q-Former on 8-frame clips, at two batch
  sizes (what ``preprocess --cache-features`` runs per GPU actor);
* stage-1 training samples/s from cached features vs from frames (the frozen encoder run online every
  step), LLM frozen in bf16, trainable parts fp32 under bf16 autocast, AdamW;
* MFU: the FLOPs of a step (``train.memory.train_flops_per_sample``, written out per part) over the
  step time and the GPU's dense bf16 peak (``--peak-tflops``; known for A100/H100/H200);
* peak memory of a training step without and with ``model.llm_gradient_checkpointing``: on a GPU
  ``torch.cuda.max_memory_allocated``, and everywhere the bytes autograd keeps for backward, next to
  what ``cli.py plan`` predicts per sample.

Weights: transformers' random init on the device (the LLM at std 0.02) with the frozen ViT rescaled to
std 0.02 (its default 1e-10 is 0 in fp16). No DeepSpeed: one GPU, so no partitioning to measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import VideoLLaMA, clip_from_frames, encode_frames, preset  # noqa: E402
from pipeline.prompts import caption_sample, collate, prepare_tokenizer  # noqa: E402
from pipeline.tiny import tiny_tokenizer  # noqa: E402
from standins.synthetic import realistic_  # noqa: E402
from train.memory import llm_activation_bytes, sequence_length, train_flops_per_sample  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
CAPTION_TOKENS = 32  # stage 1: every caption padded to data.max_caption_tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int = 1) -> float:
    """Seconds per call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(preset_name: str, device: torch.device, checkpointing: bool) -> VideoLLaMA:
    cfg = dataclasses.replace(preset(preset_name), llm_gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    with torch.device(device):
        model = VideoLLaMA(cfg)
    realistic_(model.visual_encoder)
    return model.train()


def text_batch(cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Stage-1 samples of the real length: BOS + video block + a caption cut to the token limit."""
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    caption = " ".join(["a man is riding a horse on the beach at sunset"] * 8)
    samples = [caption_sample(tok, caption, max_caption_tokens=CAPTION_TOKENS) for _ in range(batch)]
    text = collate(samples, tok.pad_token_id)
    text["input_ids"] = text["input_ids"].clamp(max=cfg.llm_vocab_size - 1)  # tiny ids in any vocab
    return {k: v.to(device) for k, v in text.items()}


def feature_cache(model, device, frames: int, batch_sizes: list[int], iters: int) -> dict[int, float]:
    size = model.cfg.image_size
    out = {}
    for b in batch_sizes:
        raw = torch.randint(0, 256, (b, frames, size, size, 3), dtype=torch.uint8, device=device)

        def step(raw=raw):
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                encode_frames(model, clip_from_frames(raw))

        out[b] = b / timed(step, device, iters)
    return out


def train_step_fn(model, opt, text, inputs, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**text, **inputs()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def saved_bytes(model, text, inputs, device) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        loss = model(**text, **inputs()).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def peak_step_memory(step, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="[vit-g-7b on a GPU, tiny on a CPU]")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--cache-batches", default=None, help="clips per encoder forward [8,32 GPU; 2,4 CPU]")
    ap.add_argument("--batch", type=int, default=None, help="training micro-batch [16 GPU; 2 CPU]")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations [10 GPU; 2 CPU]")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    torch.set_flush_denormal(True)  # Adam state of random tiny weights turns denormal: slow CPU math
    name = args.preset or ("vit-g-7b" if gpu else "tiny")
    cache_batches = [int(x) for x in (args.cache_batches or ("8,32" if gpu else "2,4")).split(",")]
    batch, iters = args.batch or (16 if gpu else 2), args.iters or (10 if gpu else 2)
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"[gpu_bench] {name} on {where}, {args.frames} frames, training micro-batch {batch}", flush=True)

    result: dict = {"preset": name, "device": where, "batch": batch}
    for checkpointing in (False, True):
        t0 = time.perf_counter()
        model = build(name, device, checkpointing)
        cfg = model.cfg
        build_s = time.perf_counter() - t0
        text = text_batch(cfg, batch, device)
        size = cfg.image_size
        raw = torch.randint(0, 256, (batch, args.frames, size, size, 3), dtype=torch.uint8, device=device)
        with torch.autocast(device.type, enabled=gpu):
            feats = encode_frames(model, clip_from_frames(raw)).to(torch.float16)
        opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-5)
        seq = sequence_length(cfg, "caption", CAPTION_TOKENS, 0)
        tag = "with_ckpt" if checkpointing else "no_ckpt"
        if not checkpointing:
            result["build_s"] = build_s
            result["cache_clips_per_s"] = feature_cache(model, device, args.frames, cache_batches, iters)
            for kind, inputs in (
                ("features", lambda feats=feats: {"features": feats}),
                ("frames", lambda raw=raw: {"clip": clip_from_frames(raw)}),
            ):
                step = train_step_fn(model, opt, text, inputs, device)
                seconds = timed(step, device, iters)
                flops = train_flops_per_sample(cfg, seq, args.frames, kind, checkpointing)
                result[f"train_{kind}"] = {
                    "samples_per_s": batch / seconds,
                    "step_s": seconds,
                    "flops_per_sample": flops,
                    "tflops_per_s": batch * sum(flops.values()) / seconds / 1e12,
                }
        on_features = lambda feats=feats: {"features": feats}  # noqa: E731
        result[f"peak_bytes_{tag}"] = peak_step_memory(
            train_step_fn(model, opt, text, on_features, device), device
        )
        result[f"saved_bytes_per_sample_{tag}"] = saved_bytes(model, text, on_features, device) / batch
        result[f"plan_llm_bytes_per_sample_{tag}"] = llm_activation_bytes(cfg, seq, checkpointing)
        del model, opt
        if gpu:
            torch.cuda.empty_cache()

    peak = peak_tflops(device, args.peak_tflops)
    for kind in ("features", "frames"):
        r = result[f"train_{kind}"]
        r["mfu"] = r["tflops_per_s"] / peak if peak else None
    report(result, peak)
    return result


def report(r: dict, peak: float | None) -> None:
    print("feature cache (ViT fp16 + image Q-Former):")
    for b, v in r["cache_clips_per_s"].items():
        print(f"  batch {b:>3} clips: {v:8.2f} clips/s")
    for kind in ("features", "frames"):
        t = r[f"train_{kind}"]
        parts = ", ".join(f"{k} {v / 1e9:,.1f} GFLOP" for k, v in t["flops_per_sample"].items())
        mfu = f"MFU {t['mfu']:.1%} of {peak:g} TFLOP/s" if t["mfu"] is not None else "MFU n/a (no peak known)"
        print(
            f"train from {kind:8}: {t['samples_per_s']:8.2f} samples/s ({t['step_s'] * 1e3:.1f} ms/step), "
            f"{t['tflops_per_s']:.2f} TFLOP/s, {mfu}\n  FLOPs per sample: {parts}"
        )
    ratio = r["train_features"]["samples_per_s"] / r["train_frames"]["samples_per_s"]
    print(f"features / frames: {ratio:.2f}x")
    for tag, what in (("no_ckpt", "without"), ("with_ckpt", "with")):
        peak_b = r[f"peak_bytes_{tag}"]
        mem = f"peak {peak_b / 2**30:.2f} GiB, " if peak_b is not None else ""
        print(
            f"training step {what} LLM checkpointing: {mem}autograd keeps "
            f"{r[f'saved_bytes_per_sample_{tag}'] / 2**20:.2f} MiB/sample "
            f"(plan, LLM part: {r[f'plan_llm_bytes_per_sample_{tag}'] / 2**20:.2f} MiB)"
        )
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}, default=str))


if __name__ == "__main__":
    run()
