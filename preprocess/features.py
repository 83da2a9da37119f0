"""The feature-cache step: a Ray actor pool running the frozen ViT + ln_vision + image Q-Former.

Each actor builds the frozen encoder once (on its GPU when it has one), then finishes whole shards:
it reads a shard's staged work units, encodes the clips in batches, writes the final shard with
``features`` (fp16 ``[T, 32, D]`` per sample, or ``[views, T, 32, D]``) beside or instead of the
frames, and writes the shard's index part (its commit marker). Every sample's metadata names the
encoder that made it (``encoder``: config fingerprint + content hash of the weights), so a trainer
can refuse features from another encoder.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.shards import batches
from preprocess.config import PreprocessConfig
from preprocess.steps import finish_shard


def encoder_identity(cfg: PreprocessConfig, weights_hash: str) -> str:
    return f"{cfg.features.model_config().encoder_fingerprint()}-{weights_hash}"


class ShardEncoder:
    """Ray Data callable class: one instance per actor, called with batches of one shard each."""

    def __init__(self, cfg: PreprocessConfig):
        import torch

        from pipeline.model import FrozenEncoder, vision_for_device
        from pipeline.weights import load_frozen_encoder

        self.cfg = cfg
        model_cfg = cfg.features.model_config()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.features.num_cpus)))
        encoder = FrozenEncoder(model_cfg, seed=cfg.features.seed)
        if model_cfg.has_encoder_weights:
            load_frozen_encoder(encoder)
        self.identity = encoder_identity(cfg, encoder.weights_fingerprint())
        vision_for_device(encoder, self.device)
        self.encoder = encoder.to(self.device)
        self.dtype = torch.float16 if cfg.features.dtype == "float16" else torch.float32

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[N, T, H, W, 3]`` -> ``[N, T, Q, D]`` in the cache dtype."""
        import torch

        from pipeline.model import clip_from_frames

        clip = clip_from_frames(frames).to(self.device)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            out = self.encoder(clip)
        return out.to(self.dtype).cpu().numpy()

    def view_frames(self, sample: dict[str, Any]) -> np.ndarray:
        """The frames the encoder sees: with views > 1 (and ``crop_views``), each view cropped by the
        original's random resized crop, seeded by (seed, row, view) so a rerun writes the same bytes."""
        frames = sample["frames"]
        if self.cfg.views == 1 or not self.cfg.features.crop_views:
            return frames
        from pipeline.augment import random_resized_crop

        row = zlib.crc32(str(sample["key"]).encode())  # keys are row numbers; any string works
        return np.stack(
            [
                random_resized_crop(v, np.random.default_rng([self.cfg.seed, 5, row, k]), self.cfg.size)
                for k, v in enumerate(frames)
            ]
        )

    def encode_samples(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Staged samples -> samples with ``features`` (and frames unless ``keep_frames`` is off)."""
        cfg, fc = self.cfg, self.cfg.features
        for batch in batches(samples, fc.batch_size):
            frames = np.stack([self.view_frames(s) for s in batch])
            views = frames.shape[1] if cfg.views > 1 else None
            if views:  # [N, K, T, ...] -> [N*K, T, ...] and back
                frames = frames.reshape(-1, *frames.shape[2:])
            feats = self.encode(frames)
            if views:
                feats = feats.reshape(len(batch), views, *feats.shape[1:])
            for s, f in zip(batch, feats, strict=True):
                s["meta"]["encoder"] = self.identity
                yield {**s, "features": f, "frames": s["frames"] if fc.keep_frames else None}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Units whose shard is complete (``ready``) are encoded into the final shard; others pass."""
        for shard, units, digest, ready in zip(
            batch["shard"], batch["units"], batch["digest"], batch["ready"], strict=True
        ):
            if ready:
                finish_shard(self.cfg, int(shard), int(units), str(digest), transform=self.encode_samples)
        return {**batch, "encoder": np.array([self.identity] * len(batch["shard"]))}
