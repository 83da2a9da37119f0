"""The original's random resized crop (pipeline.augment): the boxes it draws and what it does to a clip."""

import math

import numpy as np
import torch

from pipeline.augment import crop_box, random_resized_crop


def test_boxes_cover_half_to_all_of_the_frame_with_bounded_aspect():
    rng = np.random.default_rng(0)
    boxes = [crop_box(224, 224, rng) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
        assert 0.5 - 0.01 <= h * w / 224**2 <= 1.0  # rounding of h and w: at most ~1% below 0.5
        assert 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01
    areas = np.array([h * w for _, _, h, w in boxes]) / 224**2
    assert areas.min() < 0.52 and areas.max() > 0.97  # the whole range is drawn
    ratios = np.log([w / h for _, _, h, w in boxes])
    assert ratios.min() < math.log(0.78) and ratios.max() > math.log(1.28)
    assert len({b[:2] for b in boxes}) > 500  # positions vary


def test_boxes_are_a_function_of_the_seed():
    a = [crop_box(224, 224, np.random.default_rng([5, 4, 0, 7, 1])) for _ in range(3)]
    b = [crop_box(224, 224, np.random.default_rng([5, 4, 0, 7, 1])) for _ in range(3)]
    assert a == b
    assert crop_box(224, 224, np.random.default_rng([5, 4, 0, 7, 2])) != a[0]


def test_impossible_ratio_falls_back_to_a_centred_box():
    class Huge:  # every draw asks for more than the frame: torchvision's fallback
        def uniform(self, lo, hi):
            return hi if hi > 0.5 else lo

        def integers(self, lo, hi):
            raise AssertionError("no position is drawn in the fallback")

    # a 10x100 frame (ratio 10) with scale (1, 1): no draw fits; the centred box is clamped to 4/3
    assert crop_box(10, 100, Huge(), scale=(1.0, 1.0)) == (0, (100 - 13) // 2, 10, 13)


def test_one_box_for_every_frame_and_identity_on_the_full_box():
    frame = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    clip = np.stack([frame, frame, frame])
    out = random_resized_crop(clip, np.random.default_rng(3), 32)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert (out == out[0]).all()  # the same crop on every frame
    assert not np.array_equal(out[0], frame)
    # a box equal to the frame, resized to its own size: bicubic with align_corners=False is the identity
    full = random_resized_crop(clip, _FullBox(), 32)
    assert np.array_equal(full, clip)


def test_crop_is_the_box_resized():
    """A clip whose left half is black and right half white: the crop's white share is the box's."""
    clip = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    clip[:, :, 32:] = 255
    top, left, h, w = crop_box(64, 64, np.random.default_rng(11))
    out = random_resized_crop(clip, np.random.default_rng(11), 64)
    white_cols = max(0, min(left + w, 64) - max(left, 32))
    assert abs((out[0, 32, :, 0] > 127).mean() - white_cols / w) <= 2 / 64
    # views [K, T, H, W, 3] are cropped with one box too
    views = random_resized_crop(np.stack([clip, clip]), np.random.default_rng(11), 64)
    assert views.shape == (2, 2, 64, 64, 3) and np.array_equal(views[1], out)


class _FullBox:
    """Draws area fraction 1, aspect 1, position 0: the whole frame."""

    def uniform(self, lo, hi):
        return 1.0 if hi >= 1.0 else 0.0

    def integers(self, lo, hi):
        return 0


def test_bicubic_overshoot_is_clamped_not_wrapped():
    clip = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    clip[0, :, ::2] = 255  # stripes: bicubic overshoots beyond 0..255
    out = torch.from_numpy(random_resized_crop(clip, _FullBox(), 13)).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(
        torch.from_numpy(clip).permute(0, 3, 1, 2).float(), size=(13, 13), mode="bicubic"
    )
    high, low = x > 255.5, x < -0.5
    assert high.any() and low.any()
    assert (out[high] == 255).all() and (out[low] == 0).all()  # a uint8 cast would wrap these around
