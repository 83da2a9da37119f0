"""The feature cache: real Ray actor pool, tiny encoder built in code, read back and compared."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from pipeline.augment import random_resized_crop
from pipeline.config import ConfigError, load_config
from pipeline.model import FrozenEncoder, VideoLLaMA, clip_from_frames, tiny
from pipeline.shards import list_shards, read_shard
from preprocess.config import PreprocessConfig
from preprocess.job import run
from tests.conftest import SHORT_RUN, losses, run_train


def cache_cfg(corpus, out, **kw) -> PreprocessConfig:
    values = {
        "annotations": corpus["annotations"],
        "videos": corpus["videos"],
        "output": str(out),
        "size": 56,
        "samples_per_shard": 4,
        "features.enabled": True,
        "features.model": "tiny",
        "features.batch_size": 3,
        **kw,
    }
    return load_config(PreprocessConfig, values=values)


def test_cached_features_equal_running_the_encoder(ray_local, corpus, tmp_path, capfd):
    summary = run(cache_cfg(corpus, tmp_path / "out"))
    assert "constructor arguments in the object store" not in capfd.readouterr().err, "no alarming E line"
    assert summary["ok"] == sum(r == "ok" for _, r in corpus["expected"])
    encoder = FrozenEncoder(tiny(), seed=0)
    assert summary["encoder"].endswith(encoder.weights_fingerprint())
    samples = [s for p in list_shards(tmp_path / "out") for s in read_shard(p)]
    assert len(samples) == summary["ok"]
    assert not (tmp_path / "out" / "_staging").exists(), "no staging folder is left"
    for s in samples:
        assert s["features"].shape == (8, 32, 64) and s["features"].dtype == np.float16
        assert s["frames"].shape == (8, 56, 56, 3)
        assert s["meta"]["encoder"] == summary["encoder"]
        direct = encoder(clip_from_frames(s["frames"][None]))[0].to(torch.float16).numpy()
        np.testing.assert_allclose(s["features"].astype(np.float32), direct.astype(np.float32), atol=2e-3)


def test_views_and_features_only_arrow(ray_local, corpus, tmp_path):
    cfg = cache_cfg(corpus, tmp_path / "out", format="arrow", sampling="headtail", views=3)
    cfg.features.keep_frames = False
    summary = run(cfg)
    samples = [s for p in list_shards(tmp_path / "out") for s in read_shard(p)]
    assert len(samples) == summary["ok"] > 0
    for s in samples:
        assert "frames" not in s and s["features"].shape == (3, 8, 32, 64)
        views = s["meta"]["frame_indices"]
        assert len(views) == 3 and all(len(v) == 8 for v in views)
        assert len({tuple(v) for v in views}) > 1, "views are independent headtail draws"
        assert not np.array_equal(s["features"][0], s["features"][1]) or views[0] == views[1]


def test_each_view_is_encoded_under_its_own_crop(ray_local, corpus, tmp_path):
    """--views K with the cache: view k of row r is encoded after the original's random resized crop
    drawn from (seed, 5, crc32(key), k); the stored frames stay uncropped."""
    summary = run(cache_cfg(corpus, tmp_path / "out", sampling="headtail", views=2, seed=7))
    encoder = FrozenEncoder(tiny(), seed=0)
    samples = [s for p in list_shards(tmp_path / "out") for s in read_shard(p)]
    assert len(samples) == summary["ok"] > 0
    for s in samples:
        row = zlib.crc32(s["key"].encode())
        crops = np.stack(
            [
                random_resized_crop(v, np.random.default_rng([7, 5, row, k]), 56)
                for k, v in enumerate(s["frames"])
            ]
        )
        direct = encoder(clip_from_frames(crops)).to(torch.float16).numpy()
        np.testing.assert_allclose(s["features"].astype(np.float32), direct.astype(np.float32), atol=2e-3)
        uncropped = encoder(clip_from_frames(s["frames"])).numpy()
        # and they are not the uncropped views' features at the same tolerance
        assert np.abs(uncropped - s["features"].astype(np.float32)).max() > 2e-3


def test_cached_features_train_path_matches_frames_path(corpus, tmp_path):
    """The trainable part sees the same input whether the batch carries frames or cached features."""
    model = VideoLLaMA(tiny()).eval()
    frames = np.random.default_rng(0).integers(0, 255, size=(2, 8, 56, 56, 3), dtype=np.uint8)
    cached = FrozenEncoder(tiny(), seed=0)(clip_from_frames(frames))
    torch.testing.assert_close(model.encode_frames(clip_from_frames(frames)), cached)


def test_size_must_match_encoder(corpus, tmp_path):
    with pytest.raises(ConfigError, match="takes 56x56 frames"):
        cache_cfg(corpus, tmp_path / "o", size=32)


def test_size_defaults_to_the_encoders_image_size(tmp_path):
    """Without --size, --cache-features decodes at the encoder's size; without the cache, at 224."""
    inputs = {"annotations": "a.csv", "videos": "v", "output": str(tmp_path / "o")}
    cached = load_config(
        PreprocessConfig, values={**inputs, "features.enabled": True, "features.model": "tiny"}
    )
    assert cached.size == tiny().image_size == 56
    assert load_config(PreprocessConfig, values={**inputs, "features.enabled": True}).size == 224
    assert load_config(PreprocessConfig, values=inputs).size == 224


@pytest.mark.slow
def test_trainer_consumes_the_real_feature_cache(ray_local, frame_corpus, short_frames_run, tmp_path):
    """Shards from ``--cache-features`` train like the frame shards of the same clips (fp16 cache)."""
    # short_frames_run trained on the frame shards of frame_corpus (size 56, 2 per shard)
    cached = cache_cfg(frame_corpus, tmp_path / "cached", samples_per_shard=2)
    assert run(cached)["ok"] == 8
    run_train(1, f"data.shards={tmp_path / 'cached'}", f"run_dir={tmp_path / 'rc'}", *SHORT_RUN)
    c, f = losses(tmp_path / "rc"), losses(short_frames_run)
    assert sorted(c) == [1, 2, 3] and all(abs(c[s] - f[s]) < 5e-3 for s in c), (c, f)


@pytest.mark.slow
def test_one_worker_with_the_encoder_gets_a_cpu_of_its_own(corpus, tmp_path):
    """``--workers 1 --cache-features``: the encoder actor holds its CPU for the whole job, so a 1-CPU
    local cluster could never start a decoding task (the job hung, idle, in the real-size rehearsal).
    The local cluster gets the workers' CPUs plus the actors'."""
    import json
    import subprocess
    import sys

    from preprocess.job import local_cpus
    from tests.conftest import REPO

    cfg = cache_cfg(corpus, tmp_path / "o", workers=1)
    assert local_cpus(cfg) == 2
    assert (
        local_cpus(load_config(PreprocessConfig, values={**vars(cfg), "features": {"enabled": False}})) == 1
    )
    assert local_cpus(cache_cfg(corpus, tmp_path / "o", workers=3, **{"features.concurrency": 2})) == 5
    assert local_cpus(cache_cfg(corpus, tmp_path / "o")) >= 2  # all cores, at least one beside the actor

    out = tmp_path / "one_worker"
    cmd = [sys.executable, "cli.py", "preprocess", "--annotations", corpus["annotations"], "--videos"]
    cmd += [corpus["videos"], "--output", str(out), "--workers", "1", "--cache-features", "--encoder", "tiny"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == sum(s == "ok" for _, s in corpus["expected"]) > 0
