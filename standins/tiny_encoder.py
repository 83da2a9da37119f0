"""A tiny frozen encoder trained in minutes as a stand-in for EVA-CLIP + BLIP-2 (``cli.py tiny-encoder``).

The real model's frozen ViT-g + BLIP-2 Q-Former were pretrained on hundreds of millions of captioned
images: what an object is, its colour and where it sits survive into the 32 query outputs of every
frame. A random tiny encoder keeps almost none of it: on the grounded corpus a linear probe on its
features reads colour 30-38 %, shape 27-39 % and (first vs last frame) direction 21-43 % on held-out clips,
all near chance, because a small shape over a noisy background is a few percent of the pixels.

So the tiny preset's encoder is *trained*, briefly, as an image model: on random still scenes (one shape
of a random kind, any colour, size and place, over the corpus's kind of blocky noise, drawn at the
squashed 596x336 -> square aspect the preprocessing produces), the mean of its 32 query outputs must tell
the shape (every shape of the grounded corpora: square / circle / triangle / wide bar / tall bar, by
cross-entropy) and regress its RGB colour, centre and size (its long side: 20-60 % of the frame height,
bars 2.5-5x longer than thick). That is
"what, what colour, where" for single images -- what CLIP-style pretraining gives the real encoder. It
never sees a video, a caption or a direction: which way a shape moves can only come from comparing
frames, which the trained video branch must learn. The images are drawn fresh from the seed, not taken
from any corpus split.

It writes a Hugging Face BLIP-2-style folder that ``features.blip2_path`` / ``model.blip2_path`` load like
the real BLIP-2 weights:

    python cli.py tiny-encoder --output demo_out/tiny_encoder
    python cli.py preprocess ... --cache-features --encoder tiny features.blip2_path=demo_out/tiny_encoder
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline import grounded
from pipeline.config import ConfigError, check_writable
from pipeline.model import FrozenEncoder, ModelConfig, clip_from_frames, frame_features, tiny
from pipeline.weights import hf_blip2_name

KINDS = grounded.SHAPES  # square, circle, triangle, wide bar, tall bar: every shape a grounded corpus draws
TARGETS = ("x", "y", "size", "red", "green", "blue")  # regressed, all in [0, 1]
ASPECT = 336 / 596  # WebVid-like 596x336 frames squashed to a square: shapes get this much narrower


@dataclass
class TinyEncoderConfig:
    output: str = ""
    steps: int = 3600
    batch_size: int = 64
    lr: float = 2e-3
    regression_weight: float = 10.0  # of the MSE on TARGETS, beside the shape cross-entropy
    min_size: float = 0.10  # half the long side of a shape, as a share of the frame height
    max_size: float = 0.30
    bar_aspect: tuple[float, float] = (2.5, 5.0)  # a bar's long side / short side
    seed: int = 0

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("tiny-encoder needs --output")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("tiny-encoder: steps and batch_size must be >= 1")
        if not 0 < self.min_size <= self.max_size < 0.5:
            raise ConfigError("tiny-encoder: need 0 < min_size <= max_size < 0.5")
        if not 1 <= self.bar_aspect[0] <= self.bar_aspect[1] < math.inf:
            raise ConfigError(f"tiny-encoder: need 1 <= bar_aspect low <= high (got {self.bar_aspect})")
        if not 0 < self.lr < math.inf or not 0 <= self.regression_weight < math.inf:  # nan fails both
            raise ConfigError(
                f"tiny-encoder: lr must be a finite number > 0 and regression_weight >= 0 "
                f"(got lr={self.lr}, regression_weight={self.regression_weight})"
            )


def random_scenes(
    n: int, size: int, cfg: TinyEncoderConfig, gen: torch.Generator
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """``n`` scenes ``[n, size, size, 3]`` uint8, their shape kinds ``[n]`` (index into KINDS) and targets
    ``[n, 6]`` (TARGETS). The shape and the blocks are drawn at twice the size and 2x2 averaged. The fine
    noise is drawn at the final size with the spread that averaging it would leave (a quarter of the
    variance on background pixels, less where the shape covers part of a pixel): the same pixels in
    distribution but for the clamp to 0..255, now after the averaging, and a quarter of the random draws."""
    r = 2 * size

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    # background: a random grey with a tint, 8x8-pixel blocks of noise (at 596x336) and fine noise
    grey = 70 + 80 * rand(n, 1, 1, 1) + (rand(n, 3, 1, 1) - 0.5) * 24
    bh, bw = max(1, round(8 * r / 336)), max(1, round(8 * r / 596))
    blocks = torch.randn(n, 3, r // bh + 1, r // bw + 1, generator=gen) * 28
    # grey + blocks on the coarse grid, then spread: the same sums as at full size, bh * bw times fewer
    backdrop = (grey + blocks).repeat_interleave(bh, 2).repeat_interleave(bw, 3)[:, :, :r, :r]
    noise = 12 * (0.5 + rand(n, 1, 1, 1))  # the fine noise's spread per pixel at twice the size
    # one shape: half its long side, half-height hh, half-width hw (squashed), centre (cx, cy), any colour
    half = r * (cfg.min_size + (cfg.max_size - cfg.min_size) * rand(n))
    kind = torch.randint(0, len(KINDS), (n,), generator=gen)
    thin = 1 / (cfg.bar_aspect[0] + (cfg.bar_aspect[1] - cfg.bar_aspect[0]) * rand(n))  # short / long side
    hh = torch.where(kind == KINDS.index("wide bar"), half * thin, half)
    hw = half * ASPECT * torch.where(kind == KINDS.index("tall bar"), thin, torch.ones(n))
    cx = hw + 2 + (r - 2 * hw - 4) * rand(n)
    cy = hh + 2 + (r - 2 * hh - 4) * rand(n)
    colour = rand(n, 3) * 255
    # u across ([n, 1, r]) and v down ([n, r, 1]) the scene, in half-sides from the centre: the masks
    # below broadcast them to [n, r, r] (a quarter of this function's time when built at full size)
    pixel = torch.arange(r) + 0.5
    u = (pixel - cx[:, None, None]) / hw[:, None, None]
    v = (pixel[:, None] - cy[:, None, None]) / hh[:, None, None]
    inside = v.abs() <= 1
    circle, triangle = (
        (kind == KINDS.index("circle"))[:, None, None],
        (kind == KINDS.index("triangle"))[:, None, None],
    )
    mask = torch.where(
        circle, u**2 + v**2 <= 1, inside & (u.abs() <= torch.where(triangle, (v + 1) / 2, torch.ones(())))
    )  # squares and bars: the whole box; the triangle's apex is up (as in the corpus)
    img = torch.where(mask[:, None], colour[:, :, None, None], backdrop)
    img = nn.functional.avg_pool2d(img, 2)
    background = 1 - nn.functional.avg_pool2d(mask[:, None].float(), 2)  # share of each pixel not the shape
    img = img + torch.randn(n, 3, size, size, generator=gen) * (noise / 2) * background.sqrt()
    img = img.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    targets = torch.stack([cx / r, cy / r, half / r, *(colour / 255).T], 1)
    return img.numpy(), kind, targets


def train_encoder(cfg: TinyEncoderConfig, mcfg: ModelConfig) -> tuple[FrozenEncoder, nn.Linear, list[dict]]:
    """The tiny encoder, its read-out head and a log every 100 steps (loss, shape accuracy on the batch)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        encoder = FrozenEncoder(mcfg, seed=cfg.seed)
        head = nn.Linear(mcfg.feature_dim, len(KINDS) + len(TARGETS))
    params = [*encoder.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    log = []
    for step in range(cfg.steps):
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 30) * cosine
        images, kind, targets = random_scenes(cfg.batch_size, mcfg.image_size, cfg, gen)
        pooled = frame_features(encoder, clip_from_frames(images[:, None]))[:, 0].mean(1)  # [B, D]
        out = head(pooled)
        loss = nn.functional.cross_entropy(out[:, : len(KINDS)], kind)
        loss = loss + cfg.regression_weight * nn.functional.mse_loss(out[:, len(KINDS) :], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            accuracy = float((out[:, : len(KINDS)].argmax(1) == kind).float().mean())
            log.append({"step": step + 1, "loss": loss.item(), "shape_accuracy": accuracy})
    encoder.requires_grad_(False)
    head.requires_grad_(False)
    encoder.eval()
    return encoder, head, log


@torch.no_grad()
def heldout_scores(encoder: FrozenEncoder, head: nn.Linear, cfg: TinyEncoderConfig, n: int = 512) -> dict:
    """Shape accuracy and mean absolute error of centre / colour on ``n`` scenes never trained on."""
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    images, kind, targets = random_scenes(n, encoder.cfg.image_size, cfg, gen)
    out = head(frame_features(encoder, clip_from_frames(images[:, None]))[:, 0].mean(1))
    error = (out[:, len(KINDS) :] - targets).abs().mean(0)
    return {
        "scenes": n,
        "shape_accuracy": float((out[:, : len(KINDS)].argmax(1) == kind).float().mean()),
        "centre_error": float(error[:2].mean()),  # share of the frame side
        "colour_error": float(error[3:].mean() * 255),  # in 0..255 levels
    }


def save_blip2_folder(encoder: FrozenEncoder, out: Path) -> None:
    """The encoder's weights under their Hugging Face BLIP-2 names, as ``features.blip2_path`` loads them."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {hf_blip2_name(k): v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"))


def run(cfg: TinyEncoderConfig) -> dict:
    cfg.validate()
    check_writable(cfg.output)  # one line now, not an OSError after minutes of training
    mcfg = tiny()
    encoder, head, log = train_encoder(cfg, mcfg)
    out = Path(cfg.output)
    save_blip2_folder(encoder, out)
    report = {
        "first_loss": log[0]["loss"],
        "last_loss": log[-1]["loss"],
        "heldout": heldout_scores(encoder, head, cfg),
        "log": log,
        "config": asdict(cfg),
    }
    (out / "tiny_encoder.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
