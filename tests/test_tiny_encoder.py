"""The tiny encoder's training scenes (standins/tiny_encoder.py): every shape of the grounded family, with
the right proportions and colour. Training the encoder itself is in tests/test_learning.py (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import grounded
from standins.tiny_encoder import ASPECT, KINDS, TinyEncoderConfig, random_scenes


@pytest.fixture(scope="module")
def scenes():
    return random_scenes(512, 56, TinyEncoderConfig(output="x"), torch.Generator().manual_seed(7))


def _box(image: np.ndarray, colour: np.ndarray) -> tuple[int, int]:
    """Height and width of the pixels that show exactly the shape's colour (the fully covered ones)."""
    ys, xs = np.nonzero((image == np.round(colour)).all(-1))
    return (int(np.ptp(ys)) + 1, int(np.ptp(xs)) + 1) if len(ys) else (0, 0)


def test_the_scenes_hold_every_shape_of_the_family(scenes):
    _, kind, _ = scenes
    assert KINDS == grounded.SHAPES
    counts = np.bincount(kind.numpy(), minlength=len(KINDS))
    assert counts.min() >= 512 / len(KINDS) * 0.7, counts


def test_shapes_have_their_proportions_and_colour(scenes):
    images, kind, targets = scenes
    ratios: dict[str, list[float]] = {k: [] for k in KINDS}
    for image, k, t in zip(images, kind.tolist(), targets.numpy(), strict=True):
        long_side = 2 * t[2] * 56  # pixels at 56 px
        if long_side < 20:  # small shapes: too few whole pixels to measure
            continue
        h, w = _box(image, t[3:] * 255)
        assert h and w, KINDS[k]  # the inside of the shape is its colour, without noise
        ratios[KINDS[k]].append(h / w)
    # squashed to a square frame: a square is 1 / ASPECT = 1.77x taller than wide; bars 2.5-5x longer
    assert 1.4 < np.median(ratios["square"]) < 2.2, ratios["square"]
    assert min(ratios["tall bar"]) > 2.5 / ASPECT * 0.7 and np.median(ratios["tall bar"]) > 5, ratios[
        "tall bar"
    ]
    assert max(ratios["wide bar"]) < 1 / (2.5 * ASPECT) * 1.4, ratios["wide bar"]
    assert float(targets.min()) >= 0 and float(targets.max()) <= 1  # TARGETS are shares in [0, 1]
