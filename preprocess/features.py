"""The feature-cache step: a Ray actor pool running the frozen ViT + ln_vision + image Q-Former.

Each actor builds the frozen encoder once (on its GPU when it has one), then finishes whole shards:
it reads a staged frame shard, encodes the clips in batches, writes the final shard with
``features`` (fp16 ``[T, 32, D]`` per sample, or ``[views, T, 32, D]``) beside or instead of the
frames, and writes the shard's index part (its commit marker). Every sample's metadata names the
encoder that made it (``encoder``: config fingerprint + content hash of the weights), so a trainer
can refuse features from another encoder.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from pipeline.shards import ShardWriter, read_shard
from preprocess.config import PreprocessConfig
from preprocess.steps import staging_path, write_part


def encoder_identity(cfg: PreprocessConfig, weights_hash: str) -> str:
    return f"{cfg.features.model_config().encoder_fingerprint()}-{weights_hash}"


class ShardEncoder:
    """Ray Data callable class: one instance per actor, called with batches of one shard each."""

    def __init__(self, cfg: PreprocessConfig):
        import torch

        from pipeline.model import FrozenEncoder
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

    def finish_shard(self, shard: int) -> None:
        cfg, fc = self.cfg, self.cfg.features
        src = staging_path(cfg, shard)
        final = src.parent.parent / src.name
        writer = ShardWriter(final, cfg.format)
        try:
            samples = list(read_shard(src))
            for start in range(0, len(samples), fc.batch_size):
                batch = samples[start : start + fc.batch_size]
                frames = np.stack([s["frames"] for s in batch])
                views = frames.shape[1] if cfg.views > 1 else None
                if views:  # [N, K, T, ...] -> [N*K, T, ...] and back
                    frames = frames.reshape(-1, *frames.shape[2:])
                feats = self.encode(frames)
                if views:
                    feats = feats.reshape(len(batch), views, *feats.shape[1:])
                for s, f in zip(batch, feats, strict=True):
                    s["meta"]["encoder"] = self.identity
                    writer.write({**s, "features": f, "frames": s["frames"] if fc.keep_frames else None})
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {"shard": [], "index": [], "seconds": [], "encoder": []}
        for shard, index, seconds in zip(batch["shard"], batch["index"], batch["seconds"], strict=True):
            t0 = time.monotonic()
            self.finish_shard(int(shard))
            write_part(self.cfg, int(shard), json.loads(index))  # commit marker, after the shard
            staging_path(self.cfg, int(shard)).unlink(missing_ok=True)
            out["shard"].append(int(shard))
            out["index"].append(index)
            out["seconds"].append(float(seconds) + time.monotonic() - t0)
            out["encoder"].append(self.identity)
        return {k: np.array(v) for k, v in out.items()}
