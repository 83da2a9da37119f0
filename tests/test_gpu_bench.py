"""benchmarks/gpu_bench.py runs on the CPU at the tiny preset, so the GPU command is known to work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.model import tiny
from train.memory import train_flops_per_sample

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


@pytest.mark.slow
def test_gpu_bench_runs_at_the_tiny_preset_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run(["--iters", "1", "--batch", "2", "--cache-batches", "1,2", "--peak-tflops", "0.5"])
    assert r["preset"] == "tiny" and set(r["cache_clips_per_s"]) == {1, 2}
    assert all(v > 0 for v in r["cache_clips_per_s"].values())
    feats, frames = r["train_features"], r["train_frames"]
    assert feats["flops_per_sample"] == train_flops_per_sample(tiny(), 65, 8, "features")
    assert frames["flops_per_sample"]["encoder"] > 0 == feats["flops_per_sample"]["encoder"]
    for t in (feats, frames):
        assert t["samples_per_s"] == pytest.approx(2 / t["step_s"])
        assert t["mfu"] == pytest.approx(t["tflops_per_s"] / 0.5)
    # checkpointing keeps only each LLM layer's input: fewer bytes for backward than without
    assert 0 < r["saved_bytes_per_sample_with_ckpt"] < r["saved_bytes_per_sample_no_ckpt"]
    assert r["peak_bytes_no_ckpt"] is None  # no CUDA allocator on a CPU
    out = capsys.readouterr().out
    assert "features / frames:" in out and "FLOPs per sample: llm" in out
