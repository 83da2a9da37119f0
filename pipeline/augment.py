"""The original's training-time augmentation, with the randomness passed in (so a run resumes exactly).

The original decodes 8 frames straight at 224x224 and then, per sample and per epoch, applies one
``RandomResizedCropVideo(224, scale=(0.5, 1.0), bicubic)`` to all frames of the clip
(``AlproVideoTrainProcessor``); images get the same crop (``blip2_image_train``, on the full image
there, on the stored 224x224 image here). Training from frames applies it per visit (train.data);
the feature cache applies it per view at preprocessing time (preprocess.features), so that
``--views K`` keeps both the temporal and the spatial augmentation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CROP_SCALE = (0.5, 1.0)  # fraction of the frame's area
CROP_RATIO = (3 / 4, 4 / 3)  # width / height, drawn log-uniformly


def crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop.get_params`` draws it: up to 10
    tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio`` that fit the
    frame, else the largest centred box with the ratio clamped."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(frames: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, size, size, 3]``: one box for every frame, resized bicubic
    (``align_corners=False``) and truncated to uint8 as the original's ``ToUint8`` (clamped first: the
    original's cast wraps bicubic overshoot around)."""
    top, left, h, w = crop_box(frames.shape[-3], frames.shape[-2], rng)
    box = torch.from_numpy(np.ascontiguousarray(frames[..., top : top + h, left : left + w, :]))
    x = box.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    out = x.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out.reshape(*frames.shape[:-3], size, size, 3).numpy()
