"""Issue 22: segments of long videos and the corpora beyond WebVid (Panda-70M, InternVid, OpenVid-1M, a
generic manifest, a folder with sidecar captions, video2dataset tars), run through the real job.

The long video is 60 s whose six 10 s parts each have their own colour, so a frame's colour says which
part it came from; a white bar that moves one pixel a frame makes every frame distinct."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.captions import CaptionCleaning, clean_caption
from pipeline.config import ConfigError
from pipeline.shards import read_shard
from preprocess.config import PreprocessConfig
from preprocess.corpora import column_mapping, parse_time
from preprocess.job import run
from standins.sample_data import write_clip

W, H, FPS = 64, 48, 5
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]


def _parts(start: int, n: int):
    for t in range(start, start + n):
        img = np.empty((H, W, 3), np.uint8)
        img[:] = COLOURS[min(t // (10 * FPS), 5)]
        img[:4, t % W] = 255  # the frame's own mark
        yield img


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    videos = tmp_path_factory.mktemp("videos")
    write_clip(videos / "vid_A.mp4", 60, fps=FPS, width=W, height=H, render=_parts)
    return videos


def _panda_csv(path: Path, rows: list[tuple[str, list, list]]) -> None:
    """Panda-70M's CSV as pandas writes it: list columns as Python reprs, quoted by the CSV writer."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoID", "url", "timestamp", "caption", "matching_score"])
        for vid, spans, captions in rows:
            w.writerow(
                [
                    vid,
                    f"https://www.youtube.com/watch?v={vid}",
                    str(spans),
                    str(captions),
                    str([0.5] * len(spans)),
                ]
            )


def _hms(s: float) -> str:
    return f"{int(s // 3600)}:{int(s // 60) % 60:02d}:{s % 60:06.3f}"


def _cfg(out: Path, **kw) -> PreprocessConfig:
    # centre crop of a 64x48 video at 48 px: no scaling, so frames compare byte for byte with PyAV's
    base = dict(
        output=str(out), size=H, resize="center_crop", samples_per_shard=4, workers=2, object_store_mb=80
    )
    return PreprocessConfig(**{**base, **kw})


def _samples(out: Path) -> dict[str, dict]:
    return {s["key"]: s for p in sorted(out.glob("shard-*.tar")) for s in read_shard(p)}


def _shown_at(path: Path, times: list[float]) -> np.ndarray:
    with av.open(str(path)) as c:
        decoded = [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    left = (W - H) // 2
    return np.stack([[img for t0, img in decoded if t0 <= t + 5e-5][-1][:, left : left + H] for t in times])


def test_parse_time_and_column_mapping():
    assert parse_time("0:00:07.800") == pytest.approx(7.8)
    assert parse_time("00:07:33.689") == pytest.approx(453.689)
    assert parse_time("01:02.5") == pytest.approx(62.5)
    assert parse_time("12.25") == 12.25 and parse_time(3) == 3.0
    for bad in ("abc", "1:75:00", "", None, "nan", True):
        with pytest.raises(ValueError):
            parse_time(bad)
    assert column_mapping("manifest", "video=path,caption=text,start=t0,end=t1") == {
        "video": "path",
        "caption": "text",
        "start": "t0",
        "end": "t1",
    }
    assert column_mapping("internvid", None)["start"] == "Start_timestamp"
    for bad, says in [
        ("video=path", "no column for caption"),
        ("video=path,caption=text,start=t0", "both start and end"),
        ("video=path,caption=text,fps=x", "not field=column"),
    ]:
        with pytest.raises(ConfigError, match=says):
            column_mapping("manifest", bad)
    with pytest.raises(ConfigError, match="needs --columns"):
        _cfg(Path("o"), dataset="manifest", annotations="a.csv", videos="v").validate()


@pytest.mark.slow
def test_panda70m_segments_sample_inside_their_parts(ray_local, long_video, tmp_path):
    quoted = 'a "quoted" caption, with commas, and it\'s green'
    spans = [[_hms(10 * k), _hms(10 * k + 10)] for k in range(6)]
    captions = [f"part {k}" for k in range(6)]
    captions[1] = quoted
    bad = [["0:01:10.000", "0:01:20.000"], ["0:00:30.000", "0:00:20.000"], ["0:00:05.000", "0:00:05.100"]]
    csv_path = tmp_path / "panda.csv"
    _panda_csv(
        csv_path,
        [
            ("vid_A", spans, captions),
            ("vid_A", bad, ["outside", "inverted", "too short"]),
            ("vid_gone", [["0:00:00.000", "0:00:05.000"]], ["missing"]),
        ],
    )
    out = tmp_path / "out"
    summary = run(_cfg(out, dataset="panda70m", annotations=str(csv_path), videos=str(long_video)))
    assert (summary["total"], summary["ok"]) == (10, 6)
    assert summary["failures"] == {
        "segment_outside_video": 1,
        "segment_inverted": 1,
        "segment_too_short": 1,
        "missing_file": 1,
    }
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["reason"] or r["status"] for r in index] == ["ok"] * 6 + [
        "segment_outside_video",
        "segment_inverted",
        "segment_too_short",
        "missing_file",
    ]
    assert [(r["start"], r["end"]) for r in index[6:9]] == [(70.0, 80.0), (30.0, 20.0), (5.0, 5.1)]
    samples = _samples(out)
    assert sorted(samples) == [f"{k:09d}" for k in range(6)]  # keyed by segment, in list order
    for k in range(6):
        s = samples[f"{k:09d}"]
        meta, times = s["meta"], s["meta"]["timestamps"]
        assert (meta["start"], meta["end"], meta["segment"], meta["videoid"]) == (
            10.0 * k,
            10.0 * k + 10,
            k,
            "vid_A",
        )
        assert meta["caption_raw"] == (quoted if k == 1 else f"part {k}")  # the list field parsed whole
        assert s["caption"] == clean_caption(meta["caption_raw"], CaptionCleaning())
        assert all(10 * k <= t < 10 * k + 10 for t in times), times
        assert times == pytest.approx([10 * k + 1.25 * i for i in range(8)], abs=0.2)  # uniform over the part
        assert index[k]["timestamps"] == times and (index[k]["start"], index[k]["end"]) == (
            10.0 * k,
            10.0 * k + 10,
        )
        assert np.array_equal(s["frames"], _shown_at(long_video / "vid_A.mp4", times))
        colour = s["frames"][:, 8:].reshape(-1, 3).mean(axis=0)  # below the bar
        assert np.abs(colour - COLOURS[k]).max() < 12, (k, colour)


@pytest.mark.parametrize("sampling", ["headtail", "random"])
def test_segment_sampling_modes_stay_inside(ray_local, long_video, tmp_path, sampling):
    rows = [
        {
            "YoutubeID": "vid_A",
            "Start_timestamp": "00:00:20.000",
            "End_timestamp": "00:00:30.000",
            "Caption": "blue",
        }
    ]
    jl = tmp_path / "internvid.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    summary = run(
        _cfg(
            out, dataset="internvid", annotations=str(jl), videos=str(long_video), sampling=sampling, views=2
        )
    )
    assert summary["ok"] == 1
    (s,) = _samples(out).values()
    for view in s["meta"]["timestamps"]:
        assert len(view) == 8 and all(20 <= t < 30 for t in view)
        if sampling == "headtail":
            assert sum(t < 25 for t in view) == 4
    assert np.abs(s["frames"][:, :, 8:].reshape(-1, 3).mean(axis=0) - COLOURS[2]).max() < 12


def test_internvid_manifest_openvid_and_folder(ray_local, long_video, tmp_path):
    # InternVid: JSON lines, one segment per line, H:MM:SS.mmm times; a bad time is a failed row
    jl = tmp_path / "InternVid-10M-FLT.jsonl"
    recs = [
        {
            "YoutubeID": "vid_A",
            "Start_timestamp": "00:00:40.000",
            "End_timestamp": "00:00:50.000",
            "Caption": "cyan",
            "UMT_Score": 0.4,
        },
        {"YoutubeID": "vid_A", "Start_timestamp": "soon", "End_timestamp": "00:00:50.000", "Caption": "x"},
    ]
    jl.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{not json\n")
    s = run(_cfg(tmp_path / "iv", dataset="internvid", annotations=str(jl), videos=str(long_video)))
    assert (s["ok"], s["failures"]) == (1, {"bad_segment": 1, "malformed_record": 1})
    (sample,) = _samples(tmp_path / "iv").values()
    assert (sample["meta"]["start"], sample["caption"]) == (40.0, "cyan")

    # a generic Parquet manifest with seconds, mapped columns, paths with extensions
    import pyarrow as pa

    table = pa.table(
        {
            "path": ["vid_A.mp4", "../escape.mp4", "vid_A", "vid_A"],
            "text": ["yellow", "x", "all of it", "half"],
            "t0": [30.5, 0.0, None, 3.0],  # no start and no end: the whole file; one alone: bad
            "t1": [39.0, 1.0, None, None],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    s = run(
        _cfg(
            tmp_path / "mf",
            dataset="manifest",
            annotations=str(tmp_path / "m.parquet"),
            videos=str(long_video),
            columns="video=path,caption=text,start=t0,end=t1",
        )
    )
    assert (s["ok"], s["failures"]) == (2, {"path_escape": 1, "bad_segment": 1})
    sample, whole = _samples(tmp_path / "mf").values()
    assert all(30.5 <= t < 39 for t in sample["meta"]["timestamps"])
    assert "start" not in whole["meta"] and whole["meta"]["duration"] == pytest.approx(60.0, abs=0.01)
    assert np.abs(sample["frames"][:, 8:].reshape(-1, 3).mean(axis=0) - COLOURS[3]).max() < 12

    # OpenVid-1M: whole files named with their extension; a manifest row without start/end is the whole file
    ov = tmp_path / "OpenVid-1M.csv"
    ov.write_text(
        "video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,seconds\n"
        "vid_A.mp4,the whole video,5.1,3.2,0.99,static,300,5,60\n"
    )
    s = run(_cfg(tmp_path / "ov", dataset="openvid", annotations=str(ov), videos=str(long_video)))
    (sample,) = _samples(tmp_path / "ov").values()
    assert "start" not in sample["meta"] and sample["meta"]["timestamps"] == pytest.approx(
        [7.5 * i for i in range(8)], abs=0.2
    )

    # a folder of one's own videos with sidecar captions; one without its caption fails with that reason
    own = tmp_path / "own"
    (own / "trip").mkdir(parents=True)
    write_clip(own / "trip" / "a.mp4", 3, fps=FPS, width=W, height=H)
    (own / "trip" / "a.txt").write_text("my own footage\n")
    write_clip(own / "b.webm.mp4", 3, fps=FPS, width=W, height=H)
    (own / "notes.txt").write_text("not a caption of any video")
    s = run(_cfg(tmp_path / "fo", dataset="folder", videos=str(own)))
    index = pq.read_table(tmp_path / "fo" / "index.parquet").to_pylist()
    assert [(r["videoid"], r["reason"] or r["status"]) for r in index] == [
        ("b.webm", "missing_caption"),
        ("trip/a", "ok"),
    ]
    assert [x["caption"] for x in _samples(tmp_path / "fo").values()] == ["my own footage"]


def _v2d_tar(path: Path, clips: list[tuple[str, bytes, list]]) -> None:
    """A video2dataset webdataset shard: KEY.mp4, KEY.txt, KEY.json with ``clips: [[start, end]]``."""
    with tarfile.open(path, "w") as tar:
        for key, video, span in clips:
            meta = {"key": key, "status": "success", "caption": f"clip {key}", "clips": [span], "url": "u"}
            for ext, data in (
                ("mp4", video),
                ("txt", f"clip {key}".encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_video2dataset_tars_keep_the_clip_span(ray_local, tmp_path):
    buf = io.BytesIO()
    write_clip(buf, 3, fps=FPS, width=W, height=H)
    tars = tmp_path / "v2d"
    tars.mkdir()
    _v2d_tar(tars / "00000.tar", [("0000000_00000", buf.getvalue(), ["00:00:07.800", "00:00:10.800"]),
                                  ("0000000_00001", buf.getvalue(), [10.8, 13.8])])  # fmt: skip
    s = run(_cfg(tmp_path / "out", tars=str(tars)))
    assert s["ok"] == 2
    got = {x["meta"]["videoid"]: x["meta"]["clip_span"] for x in _samples(tmp_path / "out").values()}
    assert got == {"0000000_00000": [7.8, 10.8], "0000000_00001": [10.8, 13.8]}


@pytest.mark.slow
def test_panda70m_killed_job_resumes_to_identical_shards(long_video, tmp_path):
    """Kill the whole process group mid-run, rerun the same command: byte-identical shards and index."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    spans = [[_hms(2.5 * k), _hms(2.5 * k + 2.5)] for k in range(24)]
    csv_path = tmp_path / "panda.csv"
    _panda_csv(
        csv_path, [("vid_A", spans, [f"piece {k}" for k in range(24)]), ("vid_gone", spans[:2], ["a", "b"])]
    )
    args = ["--dataset", "panda70m", "--annotations", str(csv_path), "--videos", str(long_video)]
    args += ["--samples-per-shard", "2", "--size", "32", "--workers", "1", "object_store_mb=80"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def cli(out: Path):
        return [sys.executable, "cli.py", "preprocess", "--output", str(out), *args]

    def digests(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}

    ref = tmp_path / "ref"
    subprocess.run(cli(ref), cwd=REPO, env=env, check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli(out),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list((out / "_parts").glob("*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = len(list((out / "_parts").glob("*.parquet")))
    assert 3 <= at_kill < 13, "the kill must land mid-run"
    r = subprocess.run(cli(out), cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_rows"] >= 2 * at_kill - 2 and (summary["total"], summary["ok"]) == (26, 24)
    assert len(digests(ref)) == 12 and digests(out) == digests(ref)
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(ref / "index.parquet"))


@pytest.mark.slow
def test_segment_shards_train_caption_and_evaluate(ray_local, long_video, tmp_path):
    """Item 4: shards of Panda-70M segments go into training, caption-shards and evaluate unchanged (the
    tiny preset's 56 px frames), each segment once under its own key, with its segment's caption."""
    from infer.batch import BatchCaptionConfig
    from infer.batch import run as caption_shards
    from infer.evaluate import EvaluateConfig
    from infer.evaluate import run as evaluate
    from infer.load import ModelSource
    from pipeline.generate import GenerationConfig
    from tests.conftest import SHORT_RUN, TINY_SIZE, losses, run_train

    csv_path = tmp_path / "panda.csv"
    spans = [[_hms(10 * k), _hms(10 * k + 10)] for k in range(6)]
    _panda_csv(csv_path, [("vid_A", spans, [f"part {k} of the video" for k in range(6)])])
    shards = tmp_path / "shards"
    summary = run(_cfg(shards, dataset="panda70m", annotations=str(csv_path), videos=str(long_video),
                       size=TINY_SIZE, resize="squash"))  # fmt: skip
    assert (summary["total"], summary["ok"]) == (6, 6)
    run_dir = tmp_path / "run"
    run_train(1, f"data.shards={shards}", f"run_dir={run_dir}", "data.workers=1", *SHORT_RUN)
    assert sorted(losses(run_dir)) == [1, 2, 3] and all(0 < v < 20 for v in losses(run_dir).values())

    out = tmp_path / "captions.jsonl"
    source = ModelSource(checkpoint=str(run_dir))
    gen = GenerationConfig(do_sample=False, max_new_tokens=4)
    done = caption_shards(
        BatchCaptionConfig(model=source, generation=gen, shards=str(shards), output=str(out))
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (done["new"], done["failed"]) == (6, 0)
    assert sorted((r["key"], r["videoid"]) for r in rows) == [(f"{k:09d}", "vid_A") for k in range(6)]

    preds = tmp_path / "preds.jsonl"
    got = evaluate(EvaluateConfig(model=source, generation=gen, shards=str(shards), metrics=True,
                                  predictions=str(preds)))  # fmt: skip
    assert got["samples"] == 6 and 0 < got["loss"] < 20
    references = sorted(json.loads(line)["reference"] for line in preds.read_text().splitlines())
    assert references == [f"part {k} of the video" for k in range(6)]
