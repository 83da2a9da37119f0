"""Frame sampling and decord decoding, run in a child process with a time and memory bound.

decord is C++ over FFmpeg: a bad file can hang it (a stalled network mount, a pipe) or make it
allocate without limit, and it leaks on large videos. So decoding happens in a long-lived child
process (``python -m pipeline.video``) that the Ray task talks to over a pipe: a request that
takes longer than ``timeout_s`` kills the child (the row fails as ``decode_timeout``), the child runs
under ``RLIMIT_AS`` (an allocation blow-up fails the row, not the node), and the child is replaced
every ``recycle_every`` clips so leaks cannot accumulate.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import select
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

_HEADER = struct.Struct("<Q")


@dataclass(frozen=True)
class SamplingSpec:
    num_frames: int = 8
    sampling: Literal["uniform", "headtail", "random"] = "uniform"
    size: int = 224
    resize: Literal["squash", "center_crop"] = "squash"
    min_frames: int = 8
    threads: int = 1
    views: int = 1  # independent draws of the sampler per clip (frames [views, T, ...] when > 1)


class DecodeFailure(Exception):
    """A per-clip failure with a short machine-readable reason (``too_short``, ``no_video_stream``, ...)."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason, self.message = reason, message


def sample_indices(vlen: int, n: int, mode: str, rng: np.random.Generator) -> list[int]:
    """The original's samplers: ``uniform`` = floor(i*vlen/n); ``headtail`` = n/2 random from each half;
    ``random`` = n distinct random frames, sorted."""
    if mode == "uniform":
        return [int(i * vlen / n) for i in range(n)]
    if mode == "headtail":
        half, rest = vlen // 2, vlen - vlen // 2
        k_head = n // 2
        head = sorted(rng.choice(half, size=k_head, replace=False).tolist()) if k_head else []
        tail = sorted(rng.choice(rest, size=n - k_head, replace=False).tolist())
        return [int(i) for i in head] + [half + int(i) for i in tail]
    if mode == "random":
        return sorted(int(i) for i in rng.choice(vlen, size=n, replace=False))
    raise ValueError(f"unknown sampling {mode!r}")


def _open_source(source: dict[str, Any]):
    """A path, or a member of a tar given by (tar, offset, size): read only those bytes."""
    if "tar" in source:
        with open(source["tar"], "rb") as f:
            f.seek(source["offset"])
            return io.BytesIO(f.read(source["size"]))
    return source["path"]


@dataclass(frozen=True)
class StreamInfo:
    """What the container's header says about its video stream (PyAV, no decoding)."""

    width: int
    height: int
    frames: int  # frame count in the header; 0 when the container does not say
    duration: float | None  # seconds, video stream (else container) duration; None when unknown
    # seconds the header's frame slots cover at its nominal rate (an AVI's index length / its rate); a cut
    # AVI loses its index and ffmpeg then reports only the duration it found, but not fewer slots
    slots_duration: float | None = None


def probe(src) -> StreamInfo:
    """Read the header with PyAV: frame size, declared frame count and duration of the video stream."""
    import av

    if isinstance(src, io.BytesIO):
        src.seek(0)
    try:
        with av.open(src) as c:
            if not c.streams.video:
                raise DecodeFailure("no_video_stream", "the file has no video stream")
            s = c.streams.video[0]
            duration = float(s.duration * s.time_base) if s.duration and s.time_base else None
            if duration is None and c.duration:
                duration = c.duration / 1e6  # AV_TIME_BASE
            rate = s.guessed_rate or s.average_rate
            slots = float(s.frames / rate) if s.frames and rate else None
            info = StreamInfo(s.codec_context.width, s.codec_context.height, s.frames or 0, duration, slots)
    except av.FFmpegError as e:
        raise DecodeFailure("decode_error", _first_line(e)) from None
    finally:
        if isinstance(src, io.BytesIO):
            src.seek(0)
    return info


def _target_size(info: StreamInfo, spec: SamplingSpec) -> tuple[int, int]:
    """(width, height) that decord should decode to: the target square, or short side = size."""
    if spec.resize == "squash":
        return spec.size, spec.size
    scale = spec.size / min(info.width, info.height)
    return max(spec.size, round(info.width * scale)), max(spec.size, round(info.height * scale))


# A file may declare 1 frame more than it holds (an edit list, a dropped trailing frame) without harm; used
# only when the header gives no duration (truncation is otherwise judged by time, see ``_truncation``).
FRAME_COUNT_SLACK = 1
# Frames may stop this many frame intervals short of the declared duration: a variable-frame-rate file (AVI
# "repeat the previous frame" slots, sparse MP4 timestamps) declares more frame slots than it has frames but
# its frames still span its duration; a download cut short stops well before it.
TRUNCATION_SLACK_FRAMES = 2
# How far the frames may run past the declared duration: reordering delay and variable frame rate make the
# header's duration (counted in decode order) short of the last frame; garbage timestamps are far beyond.
DURATION_SLACK = (1.5, 2.0)  # (factor, seconds): last frame start <= factor * duration + seconds


def frame_times(starts: np.ndarray, ends: np.ndarray, info: StreamInfo) -> tuple[np.ndarray, float]:
    """Check decord's per-frame timestamps and return (frame start times, clip duration).

    decord silently returns wrong frames when the index is untrustworthy: packets without timestamps
    (its seeks land on other frames), or a file cut short whose header promises frames that are not
    there. Either fails the clip with a reason instead of giving an "ok" sample with the wrong frames.
    """
    n = len(starts)
    if not (np.isfinite(starts).all() and np.isfinite(ends).all()) or starts[0] < -1.0:
        raise DecodeFailure(
            "bad_timestamps", f"frame timestamps are missing or invalid (first {starts[0]:.4g} s)"
        )
    if n > 1 and not (np.diff(starts) > 0).all():
        bad = int(np.argmin(np.diff(starts) > 0))
        raise DecodeFailure("bad_timestamps", f"frame timestamps not increasing at frame {bad + 1} of {n}")
    why = _truncation(starts, ends, info)
    if why:
        raise DecodeFailure("truncated", why)
    factor, seconds = DURATION_SLACK
    if info.duration is not None and starts[-1] > factor * info.duration + seconds:
        raise DecodeFailure(
            "bad_timestamps", f"frame at {starts[-1]:.4g} s in a stream of {info.duration:.4g} s"
        )
    duration = float(ends[-1] - starts[0])
    if duration <= 0:
        raise DecodeFailure("bad_timestamps", f"the frames span {duration:.4g} s")
    return starts, duration


def _truncation(starts: np.ndarray, ends: np.ndarray, info: StreamInfo) -> str:
    """Why the decodable frames look cut short, or ``""``. By time: the frames must span the declared
    duration to within ``TRUNCATION_SLACK_FRAMES`` frame intervals (the larger of the header's nominal
    interval and the frames' mean one). The header's frame count alone misjudges variable-frame-rate
    files, whose index declares slots that repeat the previous frame; it is used only without a duration."""
    n = len(starts)
    declared = max(info.duration or 0.0, info.slots_duration or 0.0)
    if not declared:
        if info.frames and n + FRAME_COUNT_SLACK < info.frames:
            return f"{n} of the {info.frames} frames the header declares are present"
        return ""
    span = float(ends[-1] - starts[0])
    interval = max(declared / info.frames if info.frames else 0.0, span / n)
    if span + TRUNCATION_SLACK_FRAMES * interval < declared:
        slots = f" ({info.frames} frame slots)" if info.frames else ""
        return (
            f"the {n} decodable frames span {span:.4g} s of the {declared:.4g} s the header declares{slots}"
        )
    return ""


# A segment may end this far past the last frame (rounded timestamps, a list written from another copy of
# the video) and is then cut at the last frame; further out it lies outside the video.
SEGMENT_END_SLACK_S = 0.5


def _segment_packets(c, s, start: float, end: float) -> tuple[list[tuple[int, bool]], bool]:
    """Demux (no decoding) from the key frame before ``start`` to past ``end``: ``(pts, is_key)`` of every
    frame packet in presentation order, and whether the file ended first. Zero-size packets (an AVI's
    "repeat the previous frame" slots) are not frames."""
    tb = s.time_base
    c.seek(max(0, int(start / tb)), stream=s, backward=True, any_frame=False)
    packets, beyond, eof = [], end + REORDER_MARGIN_S, True
    demux = c.demux(s)
    try:
        for p in demux:
            if p.size == 0:  # a repeat slot, or the flush packet at the end
                continue
            if p.pts is None:
                raise DecodeFailure(
                    "bad_timestamps", "a packet without a presentation timestamp in the segment"
                )
            packets.append((int(p.pts), bool(p.is_keyframe)))
            if p.dts is not None and float(p.dts * tb) > beyond:
                eof = False
                break
    finally:
        demux.close()  # before the next seek: PyAV asserts on a generator left open
    packets.sort()
    return packets, eof


# Demux this far past a segment's end: B-frames arrive (decode order) before frames shown earlier.
REORDER_MARGIN_S = 1.0


def decode_segment(source: dict[str, Any], spec: SamplingSpec, seed: list[int]) -> dict[str, Any]:
    """The segment ``[start, end)`` (seconds, source time) of a long video, decoded with PyAV.

    Seeks to the key frame before the segment and demuxes only to its end (no decoding) to learn the
    frames that start inside it; samples over their time span as ``frames_at`` does for a whole file;
    then decodes only from the key frame before each sampled frame (a sampled frame in the next GOP
    seeks again). decord reads and keeps an index of the whole file and its per-frame cost grows with
    the file's length, so a 10 s segment of a 10-minute video cost it 2.4x the same 10 s as a file.

    Fails as ``segment_outside_video`` (starts after the declared duration, or ends more than
    ``SEGMENT_END_SLACK_S`` past it), ``segment_too_short`` (shorter than one frame, or no frame starts
    inside it), ``truncated`` (the file's frames stop inside the segment), ``too_short``."""
    import av

    start, end = float(source["start"]), float(source["end"])
    src = _open_source(source)
    info = probe(src)
    declared = max(info.duration or 0.0, info.slots_duration or 0.0) or None
    if declared is not None and (start >= declared or end > declared + SEGMENT_END_SLACK_S):
        raise DecodeFailure(
            "segment_outside_video",
            f"segment {start:.3f}-{end:.3f} s is outside the video (0-{declared:.3f} s)",
        )
    if declared is not None:
        end = min(end, declared)
    interval = declared / info.frames if declared and info.frames else 0.0
    if end - start < interval:
        raise DecodeFailure(
            "segment_too_short",
            f"segment {start:.3f}-{end:.3f} s is shorter than one frame ({interval:.4g} s)",
        )
    width, height = _target_size(info, spec)
    try:
        with av.open(src) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = spec.threads
            tb = s.time_base
            packets, eof = _segment_packets(c, s, start, end)
            pts = np.array([p for p, _ in packets], dtype=np.int64)
            times = pts.astype(np.float64) * float(tb)
            inside = np.flatnonzero((times >= start - 1e-3) & (times < end - 1e-3))
            if not len(inside):
                if eof and (not len(times) or times[-1] < start):
                    raise DecodeFailure(  # past a declared duration: cut short; none declared: outside
                        "truncated" if declared else "segment_outside_video",
                        f"the file's frames stop before the segment at {start:.3f} s",
                    )
                raise DecodeFailure("segment_too_short", f"no frame starts inside {start:.3f}-{end:.3f} s")
            seg_pts, seg_times = pts[inside], times[inside]
            step = float(np.median(np.diff(seg_times))) if len(seg_times) > 1 else interval
            if eof and seg_times[-1] + TRUNCATION_SLACK_FRAMES * max(step, interval) < end:
                raise DecodeFailure(
                    "truncated",
                    f"the file's frames stop at {seg_times[-1]:.3f} s inside the segment (to {end:.3f} s)",
                )
            n = len(seg_pts)
            if n < spec.min_frames:
                raise DecodeFailure("too_short", f"{n} frames in the segment < {spec.min_frames} required")
            rng = np.random.default_rng(seed)
            views = [
                frames_at(
                    seg_times, end - start, sample_indices(n, spec.num_frames, spec.sampling, rng), n, start
                )
                for _ in range(spec.views)
            ]
            wanted = sorted({i for v in views for i in v})
            keys = (
                pts[[k for k, (_, key) in enumerate(packets) if key]]
                if any(k for _, k in packets)
                else pts[:1]
            )
            decoded = _decode_at(c, s, [int(seg_pts[i]) for i in wanted], keys, width, height)
    except av.FFmpegError as e:
        raise DecodeFailure("decode_error", _first_line(e)) from None
    pos = {f: k for k, f in enumerate(wanted)}
    frames = np.stack([np.stack([decoded[pos[i]] for i in v]) for v in views])
    stamps = [[round(float(seg_times[i]), 4) for i in v] for v in views]
    if spec.resize == "center_crop":
        top, left = (height - spec.size) // 2, (width - spec.size) // 2
        frames = frames[:, :, top : top + spec.size, left : left + spec.size]
    one = spec.views == 1
    return {
        "frames": np.ascontiguousarray(frames[0] if one else frames, dtype=np.uint8),
        "frame_indices": views[0] if one else views,  # positions among the segment's frames
        "timestamps": stamps[0] if one else stamps,  # seconds, in the source video's time
        "num_frames_total": n,
        "fps": round(n / (end - start), 4),
        "duration": round(end - start, 4),
        "start": round(start, 4),
        "end": round(end, 4),
    }


def _decoded(c, s, keep: set[int]):
    """Frames decoded from the current position; a packet that is not one of the ``keep`` frames is
    decoded with ``skip_frame=NONREF``: a frame no other frame refers to is then not decoded at all
    (half the frames of an x264 stream with B-frames), the frames that are kept come out unchanged."""
    ctx = s.codec_context
    demux = c.demux(s)
    try:
        for packet in demux:
            ctx.skip_frame = "DEFAULT" if packet.pts in keep else "NONREF"
            yield from ctx.decode(packet if packet.size else None)
    finally:
        ctx.skip_frame = "DEFAULT"
        demux.close()


def _decode_at(c, s, targets: list[int], keys: np.ndarray, width: int, height: int) -> list[np.ndarray]:
    """RGB frames (``width`` x ``height``) with presentation timestamps ``targets`` (sorted): decode
    forward, seeking to a target's key frame only when that key frame lies past what was decoded."""
    out: list[np.ndarray] = []
    frames, at = None, None  # the decode generator and the last pts it gave
    try:
        for target in targets:
            key = int(keys[max(0, np.searchsorted(keys, target, side="right") - 1)])
            if frames is None or at is None or at < key:
                if frames is not None:
                    frames.close()  # before the seek: PyAV asserts on a generator left open
                c.seek(key, stream=s, backward=True, any_frame=False)
                frames, at = _decoded(c, s, set(targets)), None
            frame = None
            for frame in frames:
                if frame.pts is None:
                    raise DecodeFailure("bad_timestamps", "a decoded frame without a timestamp")
                at = int(frame.pts)
                if at >= target:
                    break
            if frame is None or at != target:  # the decoder skipped or never reached the promised frame
                raise DecodeFailure(
                    "decode_error", f"the frame at {float(target * s.time_base):.3f} s did not decode"
                )
            out.append(frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR"))
    finally:
        if frames is not None:
            frames.close()
    return out


def frames_at(
    starts: np.ndarray, duration: float, positions: list[int], n: int, t0: float | None = None
) -> list[int]:
    """Frame indices for sampler positions on a uniform grid of ``n`` slots over the clip's time span.

    Position k means time ``start + k * duration / n``; the frame shown then is the last one starting at
    or before it (a quarter frame of slack absorbs float rounding). For a constant frame rate this is
    frame k itself, so samples equal the original's index sampling; for a variable frame rate the frames
    spread over time as asked instead of bunching where frames are dense.
    """
    slot = duration / n
    t0 = starts[0] if t0 is None else t0
    targets = t0 + np.asarray(positions, dtype=np.float64) * slot + 0.25 * slot
    return [int(i) for i in np.clip(np.searchsorted(starts, targets, side="right") - 1, 0, n - 1)]


def _first_line(e: Exception) -> str:
    """decord's message without its timestamp prefix, so reruns record the same text."""
    return re.sub(r"\[\d\d:\d\d:\d\d\] ", "", str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]


def decode_image(path: str, spec: SamplingSpec) -> dict[str, Any]:
    """An image as a 1-frame clip ``[1, H, W, 3]``: same size and resize mode as video frames (bicubic)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if spec.resize == "squash":
                im = im.resize((spec.size, spec.size), Image.BICUBIC)
            else:
                s = spec.size / min(w, h)
                im = im.resize((max(spec.size, round(w * s)), max(spec.size, round(h * s))), Image.BICUBIC)
                left, top = (im.width - spec.size) // 2, (im.height - spec.size) // 2
                im = im.crop((left, top, left + spec.size, top + spec.size))
            frame = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeFailure("bad_image", _first_line(e)) from None
    return {
        "frames": frame[None],
        "frame_indices": [0],
        "timestamps": [0.0],
        "num_frames_total": 1,
        "width": w,
        "height": h,
    }


def decode_clip(source: dict[str, Any], spec: SamplingSpec, seed: list[int]) -> dict[str, Any]:
    """Open with decord straight at the target size, sample indices, decode only those frames."""
    if source.get("image"):
        return decode_image(source["path"], spec)
    if "start" in source:
        return decode_segment(source, spec, seed)
    import decord

    src = _open_source(source)
    info = probe(src)
    width, height = _target_size(info, spec)
    try:
        vr = decord.VideoReader(src, width=width, height=height, num_threads=spec.threads)
    except Exception as e:  # decord raises RuntimeError / DECORDError with FFmpeg's text
        msg = _first_line(e)
        reason = "no_video_stream" if "video stream" in msg else "decode_error"
        raise DecodeFailure(reason, msg) from None
    vlen = len(vr)
    if vlen < spec.min_frames:
        raise DecodeFailure("too_short", f"{vlen} frames < {spec.min_frames} required")
    stamps = vr.get_frame_timestamp(list(range(vlen))).astype(np.float64)
    starts, duration = frame_times(stamps[:, 0], stamps[:, 1], info)
    rng = np.random.default_rng(seed)
    views = [
        frames_at(starts, duration, sample_indices(vlen, spec.num_frames, spec.sampling, rng), vlen)
        for _ in range(spec.views)
    ]
    wanted = sorted({i for v in views for i in v})  # decode each needed frame once, whatever the views
    try:
        decoded = vr.get_batch(wanted).asnumpy()
    except Exception as e:
        raise DecodeFailure("decode_error", _first_line(e)) from None
    pos = {f: i for i, f in enumerate(wanted)}
    frames = np.stack([decoded[[pos[i] for i in v]] for v in views])
    times = [[round(float(starts[i]), 4) for i in v] for v in views]
    if spec.resize == "center_crop":
        top, left = (height - spec.size) // 2, (width - spec.size) // 2
        frames = frames[:, :, top : top + spec.size, left : left + spec.size]
    indices = views if spec.views > 1 else views[0]
    times = times if spec.views > 1 else times[0]
    frames = frames if spec.views > 1 else frames[0]
    return {
        "frames": np.ascontiguousarray(frames, dtype=np.uint8),
        "frame_indices": indices,
        "timestamps": times,
        "num_frames_total": vlen,
        "fps": round(vlen / duration, 4),  # average rate over the frames' time span
        "duration": round(duration, 4),
    }


# ---- parent side ---------------------------------------------------------------------------------


def _send(stream, obj: Any) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(blob)) + blob)
    stream.flush()


def _read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:  # pipes return short reads
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError("decoder process ended" + (" mid-reply" if buf else ""))
        buf += chunk
    return bytes(buf)


def _recv(stream) -> Any:
    (n,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return pickle.loads(_read_exactly(stream, n))


class BoundedDecoder:
    """Runs :func:`decode_clip` in a child process; bounds time and memory of every clip."""

    def __init__(
        self, spec: SamplingSpec, timeout_s: float = 60.0, memory_mb: int = 4096, recycle_every: int = 500
    ):
        self.spec, self.timeout_s, self.memory_mb, self.recycle_every = (
            spec,
            timeout_s,
            memory_mb,
            recycle_every,
        )
        self.proc: subprocess.Popen | None = None
        self.served = 0
        self.restarts = 0

    def start(self) -> None:
        """Start the child now if none is running (it imports its decoders before it waits), so the
        first clip does not wait ~0.4 s for a fresh interpreter."""
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()

    def _start(self) -> None:
        # one thread per decoder: a worker is one core, and thread pools would eat the memory bound
        threads = str(self.spec.threads)
        env = dict(
            os.environ,
            VLP_DECODE_MEMORY_MB=str(self.memory_mb),
            OMP_NUM_THREADS=threads,
            OPENBLAS_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.video"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        self.served = 0

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for s in (self.proc.stdin, self.proc.stdout):
                if s:
                    s.close()
            self.proc = None

    def _wait_readable(self) -> bool:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        return bool(ready)

    def decode(self, source: dict[str, Any], seed: list[int]) -> dict[str, Any]:
        """Decoded sample dict, or raises :class:`DecodeFailure` with a reason."""
        ((_, result),) = self.decode_all([(None, source, seed)])
        if isinstance(result, DecodeFailure):
            raise result
        return result

    def decode_all(
        self, requests: Iterable[tuple[Any, dict[str, Any], list[int]]]
    ) -> Iterator[tuple[Any, Any]]:
        """``(tag, sample dict or DecodeFailure)`` for each ``(tag, source, seed)``, in order.

        The next request is sent before the current reply is handed out, so the child decodes clip
        i+1 while the caller writes clip i (the child then waits on the pipe: one decoded clip ahead
        at most). A child killed for one clip (timeout, crash, memory) takes the request queued behind
        it along; that request is sent again to the next child, so each clip gets its own result."""
        todo = iter(requests)
        sent: deque = deque()  # requests the current child holds, oldest first
        while True:
            while len(sent) < 2 and not (sent and self._must_restart()):
                request = next(todo, None)
                if request is None:
                    break
                self._send_request(request)
                sent.append(request)
            if not sent:
                return
            result = self._receive()
            tag = sent.popleft()[0]
            if self.proc is None:  # killed for that clip: the one queued behind it goes to a new child
                for request in sent:
                    self._send_request(request)
            yield tag, result

    def _must_restart(self) -> bool:
        return self.proc is None or self.proc.poll() is not None or self.served >= self.recycle_every

    def _send_request(self, request: tuple[Any, dict[str, Any], list[int]]) -> None:
        """Send to the child, starting a new one when none runs or this one has served its clips (only
        called with no request outstanding in that case). A broken pipe shows at the reply."""
        if self._must_restart():
            self.close()
            self._start()
        self.served += 1
        _, source, seed = request
        with contextlib.suppress(OSError):  # the child died: _receive reports it for this request
            _send(self.proc.stdin, (source, self.spec, seed))

    def _receive(self) -> dict[str, Any] | DecodeFailure:
        """The oldest outstanding request's result; kills the child when it is no longer trusted."""
        try:
            if not self._wait_readable():
                self.close()
                self.restarts += 1
                return DecodeFailure(
                    "decode_timeout", f"no result after {self.timeout_s:g} s; decoder killed"
                )
            status, payload = _recv(self.proc.stdout)
        except (EOFError, OSError) as e:
            code = self.proc.poll() if self.proc else None
            self.close()
            self.restarts += 1
            return DecodeFailure("decoder_crashed", f"decoder process died (exit {code}): {e}")
        if status == "ok":
            return payload
        reason, message = payload
        if reason == "decode_memory":  # the child is in an unknown state after MemoryError
            self.close()
            self.restarts += 1
        return DecodeFailure(reason, message)

    def __enter__(self) -> BoundedDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- child side ----------------------------------------------------------------------------------


def _preload() -> None:
    """Import the decoders before the first request; one that fails to import fails per clip later,
    with its message, as it would without this."""
    for name in ("decord", "av"):
        with contextlib.suppress(Exception):  # reported by decode_clip, per clip
            __import__(name)


def _serve() -> None:
    import resource

    limit_mb = int(os.environ.get("VLP_DECODE_MEMORY_MB", "0"))
    if limit_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies may reach the pipe
    _preload()  # while the parent has no clip for us yet
    while True:
        try:
            source, spec, seed = _recv(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", decode_clip(source, spec, seed))
        except DecodeFailure as e:
            reply = ("fail", (e.reason, e.message))
        except MemoryError:
            reply = ("fail", ("decode_memory", f"allocation failed under the {limit_mb} MB decoder limit"))
        except Exception as e:  # anything else is still this clip's failure, not the job's
            reply = ("fail", ("decode_error", f"{type(e).__name__}: {str(e)[:300]}"))
        _send(stdout, reply)


if __name__ == "__main__":
    _serve()
