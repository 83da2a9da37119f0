"""decord's output is checked before a clip is "ok": files made here with PyAV (or by cutting bytes)
on which decord returns frames silently wrong must fail with a reason; good clips keep their frames."""

from __future__ import annotations

import fractions
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from pipeline.video import BoundedDecoder, SamplingSpec, decode_clip
from standins.sample_data import clip_frames

W, H = 160, 96


def _encode(path: Path, fmt: str, codec: str, pts_ms: list[int] | None = None, n: int = 100, **opts):
    """n frames at 10 fps, or at the given presentation times (ms) for a variable frame rate."""
    container = av.open(str(path), "w", format=fmt, options=opts.pop("container", {}))
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    if "b_frames" in opts:
        stream.codec_context.max_b_frames = opts.pop("b_frames")
    stream.options = opts
    if pts_ms is not None:
        stream.codec_context.time_base = stream.time_base = fractions.Fraction(1, 1000)
    for i, img in enumerate(clip_frames(len(pts_ms) if pts_ms else n, W, H, seed=3)):
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    return path


def _packet_ends(path: Path) -> list[int]:
    with av.open(str(path)) as c:
        return [p.pos + p.size for p in c.demux(c.streams.video[0]) if p.size]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    x264 = {"preset": "veryfast", "g": "20"}
    out = {
        # good: H.264 mp4 with B-frames (moov first), plain MPEG-4 AVI
        "mp4": _encode(root / "good.mp4", "mp4", "libx264", container={"movflags": "+faststart"}, **x264),
        "avi": _encode(root / "good.avi", "avi", "mpeg4", b_frames=0),
        # AVI with B-frames: its packets carry no presentation timestamps for decord
        "no_pts_avi": _encode(root / "bframes.avi", "avi", "mpeg4", b_frames=2),
        # 40 frames in the first 2 s (20 fps), then one frame a second up to 9 s
        "vfr": _encode(
            root / "vfr.mp4",
            "mp4",
            "libx264",
            [i * 50 for i in range(40)] + [2000 + i * 1000 for i in range(8)],
            **x264,
        ),
    }
    data = out["mp4"].read_bytes()
    cut = max(
        e for e in _packet_ends(out["mp4"]) if e <= 0.15 * len(data)
    )  # a whole-packet cut: decord opens it
    (root / "cut.mp4").write_bytes(data[:cut])
    out["cut"] = root / "cut.mp4"
    return out


def _decode(path: Path, sampling: str = "uniform", seed=(0, 0)) -> dict:
    return decode_clip({"path": str(path)}, SamplingSpec(size=56, sampling=sampling), list(seed))


@pytest.mark.parametrize("name", ["mp4", "avi"])
def test_good_clips_keep_the_original_index_sampling_and_frames(files, name):
    vr = decord.VideoReader(str(files[name]), width=56, height=56, num_threads=1)
    n = len(vr)
    out = _decode(files[name])
    want = [int(i * n / 8) for i in range(8)]
    assert n == 100 and out["frame_indices"] == want
    assert np.array_equal(out["frames"], vr.get_batch(want).asnumpy())  # byte-identical
    assert out["duration"] == pytest.approx(10.0, abs=1e-3) and out["fps"] == pytest.approx(10.0, abs=1e-3)
    assert out["timestamps"] == pytest.approx([i / 10 for i in want], abs=1e-4)
    for sampling in ("headtail", "random"):  # constant frame rate: time positions are the same frames
        from pipeline.video import sample_indices

        rng = np.random.default_rng([4, 2])
        assert _decode(files[name], sampling, (4, 2))["frame_indices"] == sample_indices(n, 8, sampling, rng)


def test_variable_frame_rate_frames_spread_over_time(files):
    out = _decode(files["vfr"])
    # by index (the old way) 7 of 8 frames fell in the first 2 s of a 9 s clip
    assert out["duration"] == pytest.approx(9.05, abs=0.01)
    assert out["timestamps"] == pytest.approx([0.0, 1.1, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], abs=0.051)
    slot = out["duration"] / 8
    assert all(i * slot - 1.0 <= t <= i * slot + 0.25 * slot for i, t in enumerate(out["timestamps"]))
    assert sum(t < 2.0 for t in out["timestamps"]) == 2
    assert out["fps"] == pytest.approx(48 / 9.05, abs=1e-3)


def test_untrustworthy_files_fail_with_a_reason(files):
    # decord accepts both files and returns frames: the wrong ones
    assert decord.VideoReader(str(files["no_pts_avi"])).get_frame_timestamp([0])[0, 0] < -1e9
    assert 0 < len(decord.VideoReader(str(files["cut"]))) < 100
    with BoundedDecoder(SamplingSpec(size=56), timeout_s=60) as dec:
        for name, reason, says in [
            ("no_pts_avi", "bad_timestamps", "timestamps are missing or invalid"),
            ("cut", "truncated", "s of the 10 s the header declares"),
        ]:
            with pytest.raises(Exception) as e:
                dec.decode({"path": str(files[name])}, [0, 0])
            assert (e.value.reason, says in e.value.message) == (reason, True), e.value
        ok = dec.decode({"path": str(files["mp4"])}, [0, 0])  # the child still serves good clips
        assert ok["frame_indices"] == [0, 12, 25, 37, 50, 62, 75, 87]


@pytest.mark.parametrize("recycle_every", [500, 2])
def test_decode_all_keeps_one_clip_ahead_and_each_clip_its_own_result(files, tmp_path, recycle_every):
    """The pipelined decoder (next request sent before this reply is handed out) gives each request
    its own result, in order, when the child is killed for a hanging clip with the next one queued
    behind it, and when the child is recycled between clips."""
    import os

    os.mkfifo(tmp_path / "hang.mp4")  # decord's open() blocks on it forever
    names = ["mp4", "hang", "avi", "cut", "mp4", "avi"]
    paths = {**files, "hang": tmp_path / "hang.mp4"}
    with BoundedDecoder(SamplingSpec(size=56), timeout_s=3, recycle_every=recycle_every) as dec:
        got = list(dec.decode_all((i, {"path": str(paths[n])}, [0, i]) for i, n in enumerate(names)))
        assert dec.restarts == 1
    assert [tag for tag, _ in got] == list(range(len(names)))
    reasons = [getattr(r, "reason", "ok") for _, r in got]
    assert reasons == ["ok", "decode_timeout", "ok", "truncated", "ok", "ok"]
    for i, (name, (_, result)) in enumerate(zip(names, got, strict=True)):
        if name in ("mp4", "avi"):
            alone = decode_clip({"path": str(files[name])}, SamplingSpec(size=56), [0, i])
            np.testing.assert_array_equal(result["frames"], alone["frames"])
            assert result["frame_indices"] == alone["frame_indices"]
