"""How far the frozen encoder's features move with its fp16 policy, at real size (ViT-g + ln_vision +
image Q-Former) on CPU, random weights N(0, 0.02).

    python benchmarks/encoder_precision.py [--frames 2] [--threads 2] [--seed 0]

Three runs of the same weights on the same frames:

* ``fp32``: everything fp32 (the reference);
* ``original``: the original's policy (``convert_weights_to_fp16``; this project's ``build_vision_encoder``):
  Linear/Conv weights fp16, LayerNorms, embeddings and ln_vision (eps 1e-5) fp32;
* ``whole-fp16``: the whole ViT cast to fp16 with ln_vision eps 1e-6 (this project before issue 12).

It prints, for the ln_vision tokens ``[N,257,1408]`` and the Q-Former features ``[N,32,768]`` (the cached
features), the max absolute and the relative RMS difference of each policy to fp32 and between the two
policies. Memory: about 10 GB (fp32 ViT-g plus an fp16 copy).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from torch import nn
from transformers import Blip2QFormerModel

from pipeline.model import build_vision_encoder, clip_from_frames, image_qformer_config, preset


def random_init(module: nn.Module, std: float = 0.02) -> None:
    """Matrices and embeddings N(0, std), biases 0, LayerNorms (1, 0)."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if isinstance(p, nn.Parameter) and p.ndim >= 2 or "embedding" in name:
                p.normal_(0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.double(), b.double()
    rel = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    return f"max |d| {(a - b).abs().max().item():.3e}  rel RMS {rel:.3e}"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset("vit-g-7b")
    torch.manual_seed(args.seed)
    vit = build_vision_encoder(dataclasses.replace(cfg, vision_dtype="float32")).eval()
    random_init(vit)
    qformer = Blip2QFormerModel(image_qformer_config(cfg)).eval()
    random_init(qformer)
    queries = torch.randn(1, cfg.num_query_tokens, cfg.feature_dim) * 0.02
    rng = np.random.default_rng(args.seed)
    frames = rng.integers(0, 256, (args.frames, 224, 224, 3), dtype=np.uint8)
    x = clip_from_frames(frames).transpose(0, 1)  # [3,T,H,W] -> [T,3,H,W]

    def run(encoder: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        tokens = encoder(pixel_values=x).last_hidden_state.float()
        feats = qformer(
            query_embeds=queries.expand(len(x), -1, -1), encoder_hidden_states=tokens
        ).last_hidden_state
        print(f"{name}: {time.perf_counter() - t0:.0f} s for {len(x)} frames", flush=True)
        return tokens, feats

    ref = run(vit, "fp32")
    half = build_vision_encoder(cfg).eval()  # Linear/Conv fp16, the rest fp32
    half.load_state_dict(vit.state_dict())
    del vit
    original = run(half, "original policy")
    half.half()
    half.post_layernorm.eps = 1e-6
    whole = run(half, "whole-fp16 policy")
    for i, what in enumerate(("ln_vision tokens", "Q-Former features")):
        print(f"{what}:")
        print(f"  original   vs fp32      : {diff(original[i], ref[i])}")
        print(f"  whole-fp16 vs fp32      : {diff(whole[i], ref[i])}")
        print(f"  whole-fp16 vs original  : {diff(whole[i], original[i])}")
        print(f"  fp32 scale: RMS {ref[i].double().pow(2).mean().sqrt().item():.3e}")


if __name__ == "__main__":
    main()
