"""A small WebVid-layout corpus written by the project itself (no downloads).

Clips have WebVid's shape: H.264 in MP4, 596x336, 5-20 s, ~1 Mbit/s, 25 fps, with a caption each.
The picture is moving shapes over a drifting gradient plus noise, so the encoder spends real bits
and decoding costs what a real clip costs. The same ``seed`` gives the same files.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

WORDS = [
    "a",
    "aerial",
    "view",
    "of",
    "the",
    "city",
    "skyline",
    "at",
    "sunset",
    "with",
    "clouds",
    "moving",
    "slowly",
    "over",
    "the",
    "river",
    "young",
    "woman",
    "walking",
    "on",
    "beach",
    "waves",
    "crashing",
    "close",
    "up",
    "of",
    "hands",
    "typing",
    "on",
    "keyboard",
    "timelapse",
    "of",
    "traffic",
    "on",
    "highway",
    "night",
    "green",
    "forest",
    "with",
    "sunlight",
    "through",
    "trees",
    "drone",
    "shot",
    "over",
    "mountains",
    "snow",
    "slow",
    "motion",
    "water",
    "splash",
    "abstract",
    "background",
]


@dataclass(frozen=True)
class Clip:
    videoid: str
    page_dir: str
    caption: str
    seconds: float


def clip_frames(n: int, width: int, height: int, seed: int, start: int = 0) -> np.ndarray:
    """Frames ``start..start+n`` ``[n, H, W, 3]`` uint8: a drifting gradient, two moving boxes, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (rng.uniform(0, 255, size=3) + (0.3 * xx + 0.2 * yy)[..., None]).astype(np.uint8)
    noise = rng.integers(-8, 8, size=(4, height, width, 1), dtype=np.int16)
    speed = rng.uniform(0.5, 3.0, size=2)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        t = start + i
        img = np.roll(base, shift=(t % height, (3 * t) % width), axis=(0, 1)).astype(np.int16)
        for k in range(2):
            cx = int((t * speed[k] * 4 + k * width / 2) % width)
            cy = int((height / 2 + (height / 3) * np.sin(t / 15.0 + k)) % height)
            img[max(cy - 30, 0) : cy + 30, max(cx - 40, 0) : cx + 40] = (255 * k, 80, 255 - 255 * k)
        img += noise[t % 4]
        np.clip(img, 0, 255, out=img)
        out[i] = img
    return out


def write_clip(
    path: str | Path | io.BytesIO,
    seconds: float,
    *,
    fps: int = 25,
    width: int = 596,
    height: int = 336,
    seed: int = 0,
    bit_rate: int = 1_000_000,
) -> None:
    """Encode a synthetic H.264 MP4 clip with PyAV (libx264, yuv420p)."""
    n = max(1, round(seconds * fps))
    container = av.open(path, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.bit_rate = bit_rate
    stream.options = {"preset": "veryfast", "g": str(2 * fps)}
    chunk = 50  # generate frames in chunks to keep memory small for long clips
    for start in range(0, n, chunk):
        frames = clip_frames(min(chunk, n - start), width, height, seed, start)
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    container.mux(stream.encode())
    container.close()


def caption_for(rng: np.random.Generator) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(5, 14)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", "!", " (4k).", ": stock footage."])


def plan_clips(n: int, seed: int, seconds: tuple[float, float]) -> list[Clip]:
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        page = f"{(i // 50) * 50 + 1:06d}_{(i // 50) * 50 + 50:06d}"
        secs = float(np.round(rng.uniform(*seconds), 2))
        clips.append(Clip(str(1000000000 + seed * 100000 + i), page, caption_for(rng), secs))
    return clips


def make_webvid_sample(
    root: str | Path,
    clips: int = 16,
    *,
    seed: int = 0,
    seconds: tuple[float, float] = (5.0, 20.0),
    width: int = 596,
    height: int = 336,
    fps: int = 25,
    faults: bool = False,
) -> dict[str, str]:
    """Write ``root/annotations/0.csv`` (WebVid columns) and ``root/videos/<page_dir>/<videoid>.mp4``.

    ``faults`` adds three rows WebVid copies are known for: a missing file, an empty file and a
    truncated download (the preprocessing job reports each as a failed row)."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    plan = plan_clips(clips, seed, seconds)
    with open(root / "annotations" / "0.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i, c in enumerate(plan):
            path = root / "videos" / c.page_dir / f"{c.videoid}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                write_clip(path, c.seconds, fps=fps, width=width, height=height, seed=seed * 7919 + i)
            w.writerow(
                [
                    c.videoid,
                    f"https://example.invalid/{c.videoid}.mp4",
                    f"PT00H00M{int(c.seconds):02d}S",
                    c.page_dir,
                    c.caption,
                ]
            )
        if faults and plan:
            page = root / "videos" / plan[0].page_dir
            good = (page / f"{plan[0].videoid}.mp4").read_bytes()
            (page / "9000000002.mp4").write_bytes(b"")
            (page / "9000000003.mp4").write_bytes(good[: len(good) // 3])
            for vid in ("9000000001", "9000000002", "9000000003"):
                w.writerow([vid, "", "", plan[0].page_dir, f"faulty row {vid}"])
    return {"annotations": str(root / "annotations"), "videos": str(root / "videos")}


def make_webvid_tars(
    root: str | Path,
    clips: int = 8,
    *,
    per_tar: int = 4,
    seed: int = 0,
    seconds: tuple[float, float] = (5.0, 20.0),
    width: int = 596,
    height: int = 336,
    fps: int = 25,
) -> str:
    """Write WebDataset tars of videos (``KEY.mp4`` + ``KEY.json`` caption) the way WebVid mirrors do."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = plan_clips(clips, seed, seconds)
    for t in range(0, clips, per_tar):
        with tarfile.open(root / f"{t // per_tar:05d}.tar", "w") as tar:
            for i in range(t, min(t + per_tar, clips)):
                c = plan[i]
                buf = io.BytesIO()
                write_clip(buf, c.seconds, fps=fps, width=width, height=height, seed=seed * 7919 + i)
                meta = json.dumps(
                    {"videoid": c.videoid, "caption": c.caption, "page_dir": c.page_dir}
                ).encode()
                for name, data in ((f"{i:08d}.mp4", buf.getvalue()), (f"{i:08d}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return str(root)
