"""Caption video files with a trained checkpoint: one caption per video.

CPU / one GPU (the device is picked automatically; ``model.device=cpu`` forces it)::

    python cli.py caption runs/stage1_tiny clip.mp4 other.mp4 --greedy
    python cli.py caption runs/stage1 clip.mp4 --llm /models/vicuna-7b --blip2 /models/blip2-flan-t5-xxl
    python cli.py caption videollama-stage2.pth clip.mp4 --llm DIR --blip2 DIR --prompt "What happens?"

Frames are sampled as the original's inference: 8, uniform, decoded straight to the model's image size
(decord, the same ``decode_clip`` as preprocessing, so a clip gives the same frames here and in shards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infer.generate import GenerationConfig, generate_batched, prompt_spec
from infer.load import Loaded, ModelSource, load, resolve
from pipeline.config import ConfigError
from pipeline.model import clip_from_frames
from preprocess.decode import DecodeFailure, SamplingSpec, decode_clip


class VideoError(ValueError):
    """A video that cannot be read; the message names the file and the reason."""


@dataclass
class CaptionConfig:
    model: ModelSource = field(default_factory=ModelSource)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    videos: list[str] = field(default_factory=list)
    num_frames: int = 8
    sampling: str = "uniform"  # the original's inference sampler

    def validate(self) -> None:
        if not self.videos:
            raise ConfigError("videos: give at least one video file")
        if self.sampling not in ("uniform", "headtail", "random"):
            raise ConfigError(f"sampling: {self.sampling!r} is not uniform, headtail or random")


def read_video(path: str | Path, num_frames: int, size: int, sampling: str = "uniform") -> dict[str, Any]:
    """Decoded frames ``[T,size,size,3]`` uint8 + timestamps, or VideoError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video {str(path)!r} does not exist")
    spec = SamplingSpec(num_frames=num_frames, sampling=sampling, size=size, min_frames=num_frames)
    try:
        return decode_clip({"path": str(path)}, spec, seed=[0, 0])
    except DecodeFailure as e:
        raise VideoError(f"video {str(path)!r} cannot be decoded ({e.reason}): {e.message}") from None


@torch.no_grad()
def features_of(loaded: Loaded, frames: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 frames ``[B,T,H,W,3]`` -> frozen-encoder features ``[B,T,Q,D]`` on the model's device."""
    clip = clip_from_frames(np.stack(frames)).to(loaded.device)
    return loaded.model.encode_frames(clip)


def caption_features(
    loaded: Loaded, features: torch.Tensor, gen: GenerationConfig, timestamps: list | None = None
) -> list[str]:
    """Captions (or answers to ``gen.prompt``) for a batch of features."""
    spec = prompt_spec(gen)
    n = loaded.model.cfg.num_video_query_tokens
    stamps = timestamps or [None] * len(features)
    prompts = [spec.build(loaded.tokenizer, n, t) for t in stamps]
    return generate_batched(loaded.model, loaded.tokenizer, features, prompts, gen)


def run(cfg: CaptionConfig) -> list[dict[str, str]]:
    """``[{"video", "caption"}]`` in the order given. Every video is decoded before the model loads, so a
    bad file fails fast."""
    resolved = resolve(cfg.model)
    size = resolved.mcfg.image_size
    clips = [read_video(v, cfg.num_frames, size, cfg.sampling) for v in cfg.videos]
    loaded = load(cfg.model, resolved)
    captions, step = [], cfg.generation.batch_size
    for i in range(0, len(clips), step):
        chunk = clips[i : i + step]
        feats = features_of(loaded, [c["frames"] for c in chunk])
        captions += caption_features(loaded, feats, cfg.generation, [c["timestamps"] for c in chunk])
    return [{"video": v, "caption": c} for v, c in zip(cfg.videos, captions, strict=True)]
