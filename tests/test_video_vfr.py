"""Variable-frame-rate files are judged by time, not by the header's frame count (issue 21, item 4).

An AVI made by FFmpeg's muxer from sparse timestamps holds one "repeat the previous frame" slot (an
empty chunk) for each missing timestamp: its header declares 440 frame slots for 68 real frames over
29.3 s. Such a file is whole; a download of it cut short is not."""

from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.video import DecodeFailure, SamplingSpec, decode_clip, probe
from standins.sample_data import clip_frames

W, H, RATE, SLOTS, FRAMES = 160, 96, 15, 444, 68


def _sparse(path: Path, fmt: str, codec: str, **opts) -> list[int]:
    """68 frames at random slots of a 15 fps grid of 444 (the first at 0); returns their slots."""
    rng = np.random.default_rng(0)
    slots = [0, *sorted(rng.choice(np.arange(1, SLOTS), FRAMES - 1, replace=False).tolist())]
    c = av.open(str(path), "w", format=fmt, options=opts.pop("container", {}))
    s = c.add_stream(codec, rate=RATE)
    s.width, s.height = W, H
    s.pix_fmt = "rgb24" if codec == "cinepak" else "yuv420p"
    s.options = opts
    for slot, img in zip(slots, clip_frames(FRAMES, W, H, seed=3), strict=True):
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = slot, fractions.Fraction(1, RATE)
        c.mux(s.encode(frame))
    c.mux(s.encode())
    c.close()
    return slots


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vfr")
    out = {"avi": root / "vfr.avi", "mp4": root / "vfr.mp4"}
    _sparse(out["avi"], "avi", "cinepak")
    # H.264 with B-frames: the MP4 gets an edit list (its first packets have negative dts)
    _sparse(out["mp4"], "mp4", "libx264", container={"movflags": "+faststart"}, preset="veryfast", bf="2")
    for name in ("avi", "mp4"):  # downloads cut short, at half the bytes (the MP4 at a packet's end)
        data = out[name].read_bytes()
        with av.open(str(out[name])) as c:
            ends = [p.pos + p.size for p in c.demux(video=0) if p.size]
        cut = len(data) // 2 if name == "avi" else max(e for e in ends if e <= len(data) // 2)
        out[f"cut_{name}"] = root / f"cut.{name}"
        out[f"cut_{name}"].write_bytes(data[:cut])
    return out


def _shown_at(path: Path, times: list[float]) -> np.ndarray:
    """What FFmpeg (through PyAV, decoding every frame) shows at each time: the last frame starting at
    or before it (times are recorded to 4 decimals, hence the 5e-5)."""
    with av.open(str(path)) as c:
        decoded = [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    return np.stack([[img for t0, img in decoded if t0 <= t + 5e-5][-1] for t in times])


def test_headers_declare_more_slots_than_frames(files):
    avi = probe(files["avi"])
    assert (avi.frames, round(avi.slots_duration, 3)) == (440, 29.333)
    with av.open(str(files["avi"])) as c:
        packets = [p.size for p in c.demux(video=0) if p.pts is not None]
    assert len(packets) == FRAMES  # the repeat slots are empty chunks, not packets with frames
    with av.open(str(files["mp4"])) as c:
        assert min(p.dts for p in c.demux(video=0) if p.dts is not None) < 0  # an edit list shifts dts


@pytest.mark.parametrize("name", ["avi", "mp4"])
@pytest.mark.parametrize("sampling", ["uniform", "random"])
def test_vfr_file_is_ok_and_frames_are_what_ffmpeg_shows(files, name, sampling):
    # center_crop at 96 px of a 160x96 file: no scaling, so the frames compare byte for byte
    spec = SamplingSpec(size=H, resize="center_crop", sampling=sampling, min_frames=8)
    out = decode_clip({"path": str(files[name])}, spec, [0, 1])
    assert out["num_frames_total"] == FRAMES
    assert out["duration"] == pytest.approx(SLOTS / RATE if name == "avi" else 29.33, abs=0.4)
    slot, times = out["duration"] / 8, out["timestamps"]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < out["duration"]
    if sampling == "uniform":  # one frame per eighth of the 29 s (by index, 7 of 8 fell in the first 4 s)
        assert all(k * slot - 2.0 <= t < (k + 1) * slot for k, t in enumerate(times)), times
    left = (W - H) // 2
    want = _shown_at(files[name], out["timestamps"])[:, :, left : left + H]
    assert np.array_equal(out["frames"], want)


@pytest.mark.parametrize("name", ["cut_avi", "cut_mp4"])
def test_a_cut_download_stays_failed(files, name):
    with pytest.raises(DecodeFailure) as e:
        decode_clip({"path": str(files[name])}, SamplingSpec(size=56), [0, 0])
    assert e.value.reason == "truncated", e.value
    assert "the header declares" in e.value.message


@pytest.mark.parametrize("name", ["avi", "mp4"])
def test_a_segment_of_a_vfr_file_is_what_ffmpeg_shows(files, name):
    spec = SamplingSpec(size=H, resize="center_crop", num_frames=4, min_frames=4)
    out = decode_clip({"path": str(files[name]), "start": 10.0, "end": 20.0}, spec, [0, 0])
    times = out["timestamps"]
    assert (out["start"], out["end"]) == (10.0, 20.0) and all(10.0 <= t < 20.0 for t in times), times
    assert all(k * 2.5 - 2.0 <= t - 10.0 < (k + 1) * 2.5 for k, t in enumerate(times)), times  # spread
    left = (W - H) // 2
    assert np.array_equal(out["frames"], _shown_at(files[name], times)[:, :, left : left + H])


def test_a_segment_past_the_cut_of_a_download_is_truncated(files):
    spec = SamplingSpec(size=56, num_frames=4, min_frames=4)
    assert decode_clip({"path": str(files["cut_avi"]), "start": 2.0, "end": 8.0}, spec, [0, 0])["end"] == 8.0
    with pytest.raises(DecodeFailure) as e:
        decode_clip({"path": str(files["cut_avi"]), "start": 20.0, "end": 28.0}, spec, [0, 0])
    assert e.value.reason == "truncated", e.value
