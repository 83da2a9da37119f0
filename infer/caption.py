"""Caption video files with a trained checkpoint: one caption per video.

CPU / one GPU (the device is picked automatically; ``model.device=cpu`` forces it)::

    python cli.py caption runs/stage1_tiny clip.mp4 other.mp4 --greedy
    python cli.py caption runs/stage1 clip.mp4 --llm /models/vicuna-7b --blip2 /models/blip2-flan-t5-xxl
    python cli.py caption videollama-stage2.pth clip.mp4 --llm DIR --blip2 DIR --prompt "What happens?"

Frames are sampled as the original's inference: 8, uniform, decoded straight to the model's image size
(decord, the same ``pipeline.video.decode_clip`` as preprocessing, so a clip gives the same frames here and in shards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infer.load import Loaded, ModelSource, load, resolve
from pipeline.config import ConfigError
from pipeline.generate import GenerationConfig, caption_features
from pipeline.model import clip_from_frames
from pipeline.video import DecodeFailure, SamplingSpec, decode_clip


class VideoError(ValueError):
    """A video that cannot be read; the message names the file and the reason (``reason``: a short
    machine-readable word, as in the preprocessing index: missing_file, not_a_file, decode_error, ...)."""

    def __init__(self, message: str, reason: str = "decode_error"):
        super().__init__(message)
        self.reason = reason


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
    if path.is_dir():
        raise VideoError(f"video {str(path)!r} is a directory, not a video file", "not_a_file")
    if not path.is_file():
        raise VideoError(f"video {str(path)!r} does not exist", "missing_file")
    spec = SamplingSpec(num_frames=num_frames, sampling=sampling, size=size, min_frames=num_frames)
    try:
        return decode_clip({"path": str(path)}, spec, seed=[0, 0])
    except DecodeFailure as e:
        raise VideoError(
            f"video {str(path)!r} cannot be decoded ({e.reason}): {e.message}", e.reason
        ) from None


@torch.no_grad()
def features_of(loaded: Loaded, frames: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 frames ``[B,T,H,W,3]`` -> frozen-encoder features ``[B,T,Q,D]`` on the model's device."""
    clip = clip_from_frames(np.stack(frames)).to(loaded.device)
    return loaded.model.encode_frames(clip)


def _read_all(cfg: CaptionConfig, size: int) -> dict[str, dict[str, Any] | VideoError]:
    """Each video's decoded clip, or the VideoError saying why it cannot be used."""
    clips: dict[str, dict[str, Any] | VideoError] = {}
    for video in cfg.videos:
        try:
            clips[video] = read_video(video, cfg.num_frames, size, cfg.sampling)
        except VideoError as e:
            clips[video] = e
    return clips


def run(cfg: CaptionConfig) -> list[dict[str, str]]:
    """One entry per video, in the order given: ``{"video", "caption"}``, or ``{"video", "reason",
    "error"}`` for a file that cannot be read. Every video is decoded before the model loads, so one bad
    file costs nothing and the others are still captioned (the CLI then exits non-zero)."""
    resolved = resolve(cfg.model)
    clips = _read_all(cfg, resolved.mcfg.image_size)
    good = [v for v, c in clips.items() if not isinstance(c, VideoError)]
    captions, step = {}, cfg.generation.batch_size
    loaded = load(cfg.model, resolved) if good else None
    for i in range(0, len(good), step):
        chunk = [clips[v] for v in good[i : i + step]]
        feats = features_of(loaded, [c["frames"] for c in chunk])
        texts = caption_features(
            loaded.model, loaded.tokenizer, feats, cfg.generation, [c["timestamps"] for c in chunk]
        )
        captions.update(zip(good[i : i + step], texts, strict=True))
    return [
        {"video": v, "caption": captions[v]}
        if v in captions
        else {"video": v, "reason": clips[v].reason, "error": str(clips[v])}
        for v in cfg.videos
    ]
