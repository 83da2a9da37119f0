"""The linear probe of grounded-eval (infer.probe) on synthetic features whose answer is known."""

from __future__ import annotations

import numpy as np

from infer.grounded import format_report, tables
from infer.probe import probe, probe_factors, probe_input
from pipeline import grounded


def _clips(n: int, seed: int, signal: float) -> tuple[np.ndarray, list[str]]:
    """``[n, 8, 4, 6]`` features: dim 0 holds the colour's index, dim 1 the shape's (each in every frame),
    dims 2-3 the position (x, y) from a random start, moving +1 or -1 per frame by direction; the rest is noise. ``signal`` 0: noise only."""
    rng = np.random.default_rng(seed)
    colours, shapes, dirs = list(grounded.COLOURS), grounded.DEFAULT_SHAPES, grounded.DIRECTIONS
    x = rng.normal(0, 0.3, size=(n, 8, 4, 6))
    refs = []
    for i in range(n):
        c, s, d = rng.integers(4), rng.integers(3), rng.integers(4)
        step = {0: -1, 1: 1, 2: -1, 3: 1}[int(d)]  # left/up -1, right/down +1
        x[i, :, :, 0] += signal * c
        x[i, :, :, 1] += signal * s
        x[i, :, :, 2:4] += signal * rng.uniform(-5, 5, size=2)  # where it is: says nothing
        x[i, :, :, 2 + int(d) // 2] += signal * step * (np.arange(8) - 3.5)[:, None]  # the move: mean 0
        refs.append(grounded.caption(colours[c], shapes[s], dirs[d]))
    return x, refs


def test_probe_input_keeps_the_frame_order():
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    got = probe_input(x)
    assert got.shape == (2, 15)
    np.testing.assert_allclose(got[1, 5:10], x[1, 1].mean(0))


def test_probes_read_factors_the_features_hold_and_nothing_from_noise():
    x, refs = _clips(240, 0, 1.0)
    tx, trefs = _clips(80, 1, 1.0)
    got = probe_factors(x, refs, tx, trefs)
    assert got["train_clips"] == 240 and got["clips"] == 80
    assert (
        got["colour"] >= 0.95 and got["shape"] >= 0.95 and got["direction"] >= 0.95 and got["all"] >= 0.9
    ), got
    # the same labels over pure noise: about chance (1/4, 1/3, 1/4), far below the readable case
    nx, _ = _clips(240, 0, 0.0)
    ntx, _ = _clips(80, 1, 0.0)
    chance = probe_factors(nx, refs, ntx, trefs)
    assert chance["colour"] <= 0.45 and chance["shape"] <= 0.55 and chance["direction"] <= 0.45, chance
    assert chance["all"] <= 0.15


def test_direction_needs_the_frame_order():
    """Averaging the frames away (what a single-image read-out sees) leaves the direction at chance."""
    x, refs = _clips(240, 0, 1.0)
    tx, trefs = _clips(80, 1, 1.0)
    lab = lambda rs: [grounded.read_factors(r)["direction"] for r in rs]  # noqa: E731
    ordered, _, _ = probe(probe_input(x), lab(refs), probe_input(tx), lab(trefs))
    mean = lambda a: a.mean(axis=(1, 2))  # noqa: E731
    pooled, _, _ = probe(mean(x), lab(refs), mean(tx), lab(trefs))
    assert ordered >= 0.95 and pooled <= 0.45, (ordered, pooled)


def test_the_report_prints_the_probe_beside_the_model():
    acc = {"clips": 4, "colour": 1.0, "shape": 0.5, "direction": 0.25, "all": 0.25}
    r = {
        "clips": 4,
        "heldout": {"all": acc, "seen": acc, "novel": {**acc, "clips": 0}},
        "probe": {"train_clips": 12, "clips": 4, "colour": 1.0, "shape": 0.75, "direction": 1.0, "all": 0.75},
    }
    text = format_report(r)
    assert "the encoder carries colour 100.0%, shape 75.0%, direction 100.0%, all 75.0%" in text
    assert "training reached colour 100.0%, shape 50.0%, direction 25.0%" in text
    assert "direction +75.0" in text
    row = tables(r)["held-out accuracy"]["linear probe on the cached features"]
    assert row == {"colour": 1.0, "shape": 0.75, "direction": 1.0, "all": 0.75}
