"""Small WebVid-layout corpora written by the project itself (no downloads).

Clips have WebVid's shape: H.264 in MP4, 596x336, 5-20 s, ~1 Mbit/s, 25 fps, with a caption each.
The same ``seed`` gives the same files. Two kinds:

* ``make_webvid_sample``: moving boxes over a drifting gradient plus noise, captioned with random
  stock-footage words (decoding costs what a real clip costs; the captions say nothing about it).
* ``make_grounded_sample``: one coloured shape moving over a noisy background, captioned with what it
  shows (``a red square moves left``, see ``pipeline.grounded``), as a ``train/`` and a ``heldout/``
  split of fresh renders; the held-out split also holds combinations never seen in training. The
  annotation CSVs carry each clip's factors (columns ``colour``, ``shape``, ``direction``,
  ``combination`` = ``seen``/``novel``) next to the WebVid columns, which the preprocessing job
  ignores and ``pipeline.grounded`` scores against. Training on it can *learn*: the caption is a
  function of the pictures, and the direction only of their order.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import av
import numpy as np

from pipeline import grounded
from pipeline.config import ConfigError, load_config
from pipeline.grounded import FACTORS

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
    render: Callable[[int, int], Iterable[np.ndarray]] | None = None,
) -> None:
    """Encode a synthetic H.264 MP4 clip with PyAV (libx264, yuv420p).

    ``render(start, n)`` yields frames ``start..start+n`` (``[H, W, 3]`` uint8; default: ``clip_frames``)."""
    n = max(1, round(seconds * fps))
    if render is None:
        render = partial(_boxes, width=width, height=height, seed=seed)
    container = av.open(path, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.bit_rate = bit_rate
    # The same frames must give the same bytes, so that a rerun trains on the same corpus. Two x264
    # defaults broke that (one clip of 321 came out differently in a rerun): its macroblock tree reads
    # memory it has not written (glibc's MALLOC_PERTURB_ changes the stream), and its frame threads (1.5
    # per core) make the stream depend on the machine's core count. So: no mbtree, one thread per clip
    # (make_grounded_sample encodes clips in one process per core instead).
    stream.options = {"preset": "veryfast", "g": str(2 * fps), "threads": "1", "mbtree": "0"}
    chunk = 50  # generate frames in chunks to keep memory small for long clips
    for start in range(0, n, chunk):
        for img in render(start, min(chunk, n - start)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    container.mux(stream.encode())
    container.close()


def _boxes(start: int, n: int, *, width: int, height: int, seed: int) -> np.ndarray:
    return clip_frames(n, width, height, seed, start)


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
            write_faulty_rows(w, root / "videos" / plan[0].page_dir, f"{plan[0].videoid}.mp4")
    return {"annotations": str(root / "annotations"), "videos": str(root / "videos")}


FAULTY_IDS = ("9000000001", "9000000002", "9000000003")  # missing, empty, truncated


def write_faulty_rows(writer, page: Path, good_clip: str, extra: tuple[str, ...] = ()) -> None:
    """Three rows WebVid copies are known for, next to ``page/good_clip``: a missing file, an empty
    file and a truncated download (the preprocessing job reports each as a failed row). ``extra``
    fills any columns after ``name``."""
    good = (page / good_clip).read_bytes()
    (page / f"{FAULTY_IDS[1]}.mp4").write_bytes(b"")
    (page / f"{FAULTY_IDS[2]}.mp4").write_bytes(good[: len(good) // 3])
    for vid in FAULTY_IDS:
        writer.writerow([vid, "", "", page.name, f"faulty row {vid}", *extra])


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


# ---- the grounded corpus ------------------------------------------------------------------------------

GROUNDED_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name", *FACTORS, "combination")
BACKGROUNDS = ("blocks", "grey", "flicker")
REFERENCE_HEIGHT = 336  # sizes and speeds are given in pixels of a 336-px-high frame (WebVid's 596x336)


@dataclass(frozen=True)
class GroundedSettings:
    """What a grounded corpus draws. The defaults are the demo's corpus; ``VARIANTS`` names others.

    Sizes and speeds are pixels (per second) at 336 px frame height and scale with the frame."""

    shapes: tuple[str, ...] = grounded.DEFAULT_SHAPES  # from pipeline.grounded.SHAPES
    size: tuple[float, float] = (134.4, 188.16)  # the shape's long side (bars: length), px
    bar_aspect: tuple[float, float] = (2.5, 3.5)  # a bar's length / thickness
    # px/s along the move; None: the move covers 50-75 % of the free span whatever the clip's length.
    # A move longer than the free span is cut to it (the shape never leaves the frame).
    speed: tuple[float, float] | None = None
    seconds: tuple[float, float] = (5.0, 7.0)
    # blocks: static blocky + fine noise around a random grey; grey: static fine noise only;
    # flicker: fine noise drawn afresh every frame
    background: str = "blocks"
    per_combination: int = 6  # training clips per seen triple
    heldout_per_combination: int = 1  # fresh held-out renders per seen triple
    novel_per_combination: int = 3  # held-out renders per never-trained triple (grounded.novel)

    def validate(self) -> None:
        unknown = [s for s in self.shapes if s not in grounded.SHAPES]
        if unknown or len(set(self.shapes)) < 2:
            raise ValueError(
                f"shapes: at least two of {', '.join(grounded.SHAPES)} (got {', '.join(self.shapes)})"
            )
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background: one of {', '.join(BACKGROUNDS)}, not {self.background!r}")
        pairs = {"size": self.size, "bar_aspect": self.bar_aspect, "seconds": self.seconds}
        pairs.update({"speed": self.speed} if self.speed else {})
        for name, (lo, hi) in pairs.items():
            if not 0 < lo <= hi:
                raise ValueError(f"{name}: a range 0 < low <= high, not ({lo}, {hi})")
        if self.size[1] > REFERENCE_HEIGHT - 16 or self.bar_aspect[0] < 1:
            raise ValueError("size: at most 320 px (the frame is 336 high); bar_aspect: >= 1")
        if self.per_combination < 1 or min(self.heldout_per_combination, self.novel_per_combination) < 0:
            raise ValueError("per_combination must be >= 1, the held-out counts >= 0")


# The family of grounded corpora (``make-sample --grounded --variant NAME``, each with its own seed).
# Development variants are what the recipe was tuned on; no choice was tuned on the held-out ones
# (docs/LEARNING.md). "independent" reproduces the corpus of issue 20, drawn outside the project.
VARIANTS: dict[str, tuple[str, GroundedSettings, int]] = {  # name: (role, settings, seed)
    "demo": ("development", GroundedSettings(), 0),
    "dev-bars": (
        "development",
        GroundedSettings(
            shapes=("circle", "wide bar", "tall bar"), size=(100, 170), speed=(35, 70), seconds=(5, 8),
            background="grey",
        ),
        1,
    ),
    "dev-slow": (  # added after `slow`'s direction miss was seen (docs/LEARNING.md): develop on slow moves here
        "development",
        GroundedSettings(
            shapes=("square", "circle", "tall bar"), size=(100, 150), speed=(12, 22), seconds=(6, 8),
            background="grey",
        ),
        2,
    ),
    "dev-thin": (  # added after `independent`'s colour miss on thin bars was seen (docs/LEARNING.md)
        "development",
        GroundedSettings(
            shapes=("circle", "wide bar", "tall bar"), size=(70, 130), bar_aspect=(3, 4.5), speed=(25, 50),
            seconds=(5, 7),
        ),
        3,
    ),
    "independent": (
        "held-out",
        GroundedSettings(
            shapes=("square", "wide bar", "tall bar"), size=(80, 150), speed=(30, 50), seconds=(5, 8),
            background="grey", novel_per_combination=1,
        ),
        20,
    ),
    "slow": (  # a quarter of the frame or less in a clip
        "held-out",
        GroundedSettings(size=(110, 160), speed=(15, 25), seconds=(6, 8)),
        21,
    ),
    "few-flicker": (
        "held-out",
        GroundedSettings(
            shapes=("triangle", "tall bar", "circle", "square"), size=(90, 150), speed=(25, 60),
            seconds=(4, 9), background="flicker", per_combination=4,
        ),
        22,
    ),
}  # fmt: skip


def variant_settings(
    name: str | None,
    overrides: list[str] | None = None,
    seconds: tuple[float | None, float | None] = (None, None),
) -> tuple[GroundedSettings, int]:
    """A named variant's settings (default: the demo's) with ``KEY=VALUE`` overrides and either bound of
    the clip length replaced, and the variant's seed."""
    if name is not None and name not in VARIANTS:
        raise ConfigError(f"--variant: {name!r} is not one of {', '.join(VARIANTS)}")
    _, base, seed = VARIANTS[name or "demo"]
    values = dataclasses.asdict(base)
    values["seconds"] = tuple(new or old for new, old in zip(seconds, base.seconds, strict=True))
    return load_config(GroundedSettings, None, overrides, values=values), seed


@dataclass(frozen=True)
class GroundedClip:
    videoid: str
    page_dir: str
    colour: str
    shape: str
    direction: str
    combination: str  # "seen" (its triple occurs in training) or "novel" (held out as a whole)
    seconds: float
    seed: int

    @property
    def caption(self) -> str:
        return grounded.caption(self.colour, self.shape, self.direction)


def shape_mask(shape: str, height: int, width: int | None = None) -> np.ndarray:
    """Boolean ``[height, width]`` mask: a square or bar (all of it), a disk/ellipse, or an upward
    triangle (apex at the top centre, base along the bottom)."""
    width = height if width is None else width
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    if shape in ("square", "wide bar", "tall bar"):
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return ((yy - height / 2) / (height / 2)) ** 2 + ((xx - width / 2) / (width / 2)) ** 2 <= 1
    if shape == "triangle":
        return np.abs(xx - width / 2) <= yy * width / (2 * height)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(grounded.SHAPES)}")


def shape_box(shape: str, long_side: float, aspect: float) -> tuple[int, int]:
    """The shape's ``(height, width)`` in pixels: bars are ``long_side`` by ``long_side / aspect``."""
    short = max(2, int(long_side / aspect))
    side = max(2, 2 * int(long_side / 2))
    return {"wide bar": (short, side), "tall bar": (side, short)}.get(shape, (side, side))


def grounded_path(
    direction: str,
    box: tuple[int, int],
    width: int,
    height: int,
    rng: np.random.Generator,
    travel_px: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners at the first and last frame: a straight move from a random start, so no single
    frame tells the direction. ``travel_px`` None: 50-75 % of the free span along the axis; else that
    many pixels (at most the free span)."""
    horizontal = direction in ("left", "right")
    bh, bw = box
    span = (width - bw if horizontal else height - bh) - 8
    travel = rng.uniform(0.5, 0.75) * span if travel_px is None else min(travel_px, span)
    lo = 4 + rng.uniform(0, span - travel)
    a, b = (lo + travel, lo) if direction in ("left", "up") else (lo, lo + travel)
    across = 4 + rng.uniform(0, (height - bh if horizontal else width - bw) - 8)
    if horizontal:
        return np.array([a, across]), np.array([b, across])
    return np.array([across, a]), np.array([across, b])


def grounded_frames(
    clip: GroundedClip, total: int, width: int, height: int, settings: GroundedSettings | None = None
) -> Callable:
    """``render(start, n)`` for ``write_clip``: the clip's shape at its place on frame t of ``total``,
    over the settings' background around a random grey."""
    settings = settings or GroundedSettings()
    rng = np.random.default_rng(clip.seed)
    grey = rng.uniform(70, 150) + rng.uniform(-12, 12, size=3)
    blocks = rng.normal(0, 28, size=(height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
    if settings.background != "blocks":
        blocks[:] = 0
    fine = rng.normal(0, 12, size=(height, width, 3))
    background = np.clip(grey + blocks[:height, :width] + fine, 0, 255).astype(np.uint8)
    scale = height / REFERENCE_HEIGHT
    long_side = rng.uniform(*settings.size) * scale
    aspect = rng.uniform(*settings.bar_aspect) if clip.shape.endswith(" bar") else 1.0
    box = shape_box(clip.shape, long_side, aspect)
    mask = shape_mask(clip.shape, *box)
    travel = None if settings.speed is None else rng.uniform(*settings.speed) * scale * clip.seconds
    first, last = grounded_path(clip.direction, box, width, height, rng, travel)
    colour = np.array(grounded.COLOURS[clip.colour], dtype=np.uint8)
    flicker = np.random.default_rng([clip.seed, 1]) if settings.background == "flicker" else None

    def render(start: int, n: int) -> Iterator[np.ndarray]:
        frame = np.empty_like(background)
        for t in range(start, start + n):
            x, y = np.rint(first + (last - first) * t / max(total - 1, 1)).astype(int)
            if flicker is None:
                np.copyto(frame, background)
            else:
                noise = flicker.normal(0, 12, size=(height, width, 1)).astype(np.float32)
                np.copyto(frame, np.clip(grey + noise, 0, 255).astype(np.uint8))
            patch = frame[y : y + box[0], x : x + box[1]]
            np.copyto(patch, colour, where=mask[..., None])
            yield frame

    return render


def _write_grounded(
    path: Path, clip: GroundedClip, fps: int, width: int, height: int, settings: GroundedSettings
) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    total = max(1, round(clip.seconds * fps))
    tmp = path.with_suffix(".part")
    write_clip(
        tmp,
        clip.seconds,
        fps=fps,
        width=width,
        height=height,
        render=grounded_frames(clip, total, width, height, settings),
    )
    tmp.rename(path)


def plan_grounded(settings: GroundedSettings, seed: int) -> dict[str, list[GroundedClip]]:
    """Clip specs per split: ``train`` (every seen triple ``per_combination`` times) and ``heldout``
    (fresh renders of every seen triple, then the never-trained triples), each in a shuffled order."""
    rng = np.random.default_rng(seed)
    novel = grounded.novel(settings.shapes)
    seen = [c for c in grounded.combinations(settings.shapes) if c not in novel]
    wanted = {
        "train": [(c, "seen") for c in seen for _ in range(settings.per_combination)],
        "heldout": [(c, "seen") for c in seen for _ in range(settings.heldout_per_combination)]
        + [(c, "novel") for c in novel for _ in range(settings.novel_per_combination)],
    }
    plan, n = {}, 0
    for split, items in wanted.items():
        clips = []
        for k in rng.permutation(len(items)):
            (colour, shape, direction), combination = items[k]
            page = f"{(n // 100) * 100 + 1:06d}_{(n // 100) * 100 + 100:06d}"
            secs = float(np.round(rng.uniform(*settings.seconds), 2))
            clip_seed = int(rng.integers(2**31))
            clips.append(
                GroundedClip(
                    str(2000000000 + seed * 100000 + n),
                    page,
                    colour,
                    shape,
                    direction,
                    combination,
                    secs,
                    clip_seed,
                )
            )
            n += 1
        plan[split] = clips
    return plan


def make_grounded_sample(
    root: str | Path,
    settings: GroundedSettings | None = None,
    *,
    seed: int = 0,
    width: int = 596,
    height: int = 336,
    fps: int = 25,
    faults: bool = False,
    workers: int = 2,
) -> dict[str, str]:
    """Write ``root/{train,heldout}/annotations/0.csv`` and the clips under ``root/videos/``.

    With the default settings: 44 seen triples x 6 = 264 training clips, 44 + 4 x 3 = 56 held-out
    clips. ``faults`` adds a missing, an empty and a truncated row to the training split. Clips are
    encoded by ``workers`` processes; an existing clip is kept (a rerun only writes what is missing)."""
    root = Path(root)
    settings = settings or GroundedSettings()
    settings.validate()
    plan = plan_grounded(settings, seed)
    jobs = [(root / "videos" / c.page_dir / f"{c.videoid}.mp4", c) for clips in plan.values() for c in clips]
    write = partial(_write_grounded, fps=fps, width=width, height=height, settings=settings)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write, *zip(*jobs, strict=True), chunksize=4))
    else:
        for path, clip in jobs:
            write(path, clip)
    paths = {"videos": str(root / "videos")}
    for split, clips in plan.items():
        ann = root / split / "annotations"
        ann.mkdir(parents=True, exist_ok=True)
        with open(ann / "0.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(GROUNDED_COLUMNS)
            for c in clips:
                url = f"https://example.invalid/{c.videoid}.mp4"
                w.writerow(
                    [
                        c.videoid,
                        url,
                        f"PT00H00M{int(c.seconds):02d}S",
                        c.page_dir,
                        c.caption,
                        c.colour,
                        c.shape,
                        c.direction,
                        c.combination,
                    ]
                )
            if faults and split == "train" and clips:
                write_faulty_rows(
                    w, root / "videos" / clips[0].page_dir, f"{clips[0].videoid}.mp4", ("", "", "", "")
                )
        paths[split] = str(ann)
        faulty = clips[0].page_dir if faults and split == "train" and clips else None
        paths[f"{split}_videochat"] = write_videochat(root / split / VIDEOCHAT_FILE, clips, seed, faulty)
    return paths


VIDEOCHAT_FILE = "videochat.json"  # per split, beside annotations/: the stage-2 conversations


def write_videochat(path: Path, clips: list[GroundedClip], seed: int, faulty_page: str | None = None) -> str:
    """The split's clips as a VideoChat-11K JSON (``[{video, QA: [{q, a}]}]``, videos relative to the
    corpus's ``videos/``): every question of ``grounded.QUESTIONS`` about each clip, answered from its
    factors. ``faulty_page``: also the three faulty rows' videos (missing, empty, truncated), which
    ``preprocess --dataset videochat`` reports as failed rows."""
    rng = np.random.default_rng([seed, 2])
    records = [
        {
            "video": f"{c.page_dir}/{c.videoid}.mp4",
            "QA": grounded.question_answers(c.colour, c.shape, c.direction, rng),
        }
        for c in clips
    ]
    if faulty_page is not None:
        qa = [{"q": grounded.QUESTIONS["caption"], "a": "faulty row"}]
        records += [{"video": f"{faulty_page}/{vid}.mp4", "QA": qa} for vid in FAULTY_IDS]
    path.write_text(json.dumps(records, indent=1) + "\n")
    return str(path)
