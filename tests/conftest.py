"""Shared fixtures: a local Ray cluster and small WebVid-layout corpora made in the tests."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipeline.raycluster import init_ray

    init_ray(None, 2, object_store_mb=100)  # the stages' own start: local-only, as users get it
    yield ray
    ray.shutdown()


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: permission bits for a normal user; root writes through
    them, so for root a kernel folder that refuses new files."""
    if os.geteuid() == 0:
        return Path("/sys")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked


def write_annotations(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writeheader()
        for r in rows:
            w.writerow({"contentUrl": "", "duration": "", **r})


# Every failure class of the preprocessing job, with the reason it must be recorded under.
BAD_ROWS = {
    "missing": "missing_file",
    "empty": "empty_file",
    "truncated": "decode_error",
    "notvideo": "decode_error",
    "audioonly": "no_video_stream",
    "tooshort": "too_short",
    "nopagedir": "empty_page_dir",
    "nancaption": "missing_caption",
    "escape": "path_escape",
}


def _audio_only(path: Path) -> None:
    import av
    import numpy as np

    c = av.open(str(path), "w")
    s = c.add_stream("aac", rate=16000)
    for _ in range(10):
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        fr.sample_rate = 16000
        for p in s.encode(fr):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def build_corpus(root: Path, good: int = 6, bad: bool = True) -> dict:
    """``good`` small H.264 clips plus one row of every failure class; returns paths and expectations."""
    from pipeline.sample_data import write_clip

    vids = root / "videos"
    page = vids / "000001_000050"
    page.mkdir(parents=True, exist_ok=True)
    rows, expected = [], []
    for i in range(good):
        vid = f"10{i:03d}"
        write_clip(page / f"{vid}.mp4", 1.0 + 0.4 * i, width=160, height=96, fps=10, seed=i)
        rows.append({"videoid": vid, "page_dir": page.name, "name": f"Clip number {i}: a (red) box!"})
        expected.append((vid, "ok"))
    if bad:
        (page / "empty.mp4").touch()
        data = (page / "10000.mp4").read_bytes()
        (page / "truncated.mp4").write_bytes(data[: len(data) // 2])
        (page / "notvideo.mp4").write_text("this is not a video " * 50)
        _audio_only(page / "audioonly.mp4")
        write_clip(page / "tooshort.mp4", 0.3, width=160, height=96, fps=10)
        (root / "outside.mp4").write_bytes(data)
        for vid, reason in BAD_ROWS.items():
            row = {"videoid": vid, "page_dir": page.name, "name": "a caption"}
            if vid == "nopagedir":
                row["page_dir"] = ""
            if vid == "nancaption":
                row["videoid"], row["name"] = "10001", ""
            if vid == "escape":
                row["videoid"], row["page_dir"] = "outside", ".."
            rows.append(row)
            expected.append((row["videoid"], reason))
    write_annotations(root / "annotations" / "part0.csv", rows[: len(rows) // 2])
    write_annotations(root / "annotations" / "part1.csv", rows[len(rows) // 2 :])
    return {"annotations": str(root / "annotations"), "videos": str(vids), "expected": expected}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("webvid"))
