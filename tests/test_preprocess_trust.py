"""Preprocessing under changed, hostile or odd input: stale shards, symlinks, empty captions, bad CSV
records, unwritable outputs, local Ray's sockets, work units and the plan (issues 11 and 14)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.captions import CaptionCleaning, clean_caption
from pipeline.config import ConfigError, load_config
from pipeline.shards import list_shards, read_shard
from pipeline.video import DecodeFailure
from preprocess.config import PreprocessConfig
from preprocess.job import MAX_TASKS, format_reasons, group_units, plan_units, run
from preprocess.plan import ShardPlan, stream_csv
from preprocess.steps import process_row, resolve_source
from tests.conftest import REPO, unwritable_folder, write_annotations


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Four short clips in one page folder (the tests copy or link them)."""
    from standins.sample_data import write_clip

    root = tmp_path_factory.mktemp("clips")
    for i in range(4):
        write_clip(root / f"{i}.mp4", 1.0, width=96, height=64, fps=10, seed=i)
    return root


def videos_of(tmp: Path, clips: Path, ids: list[str]) -> Path:
    page = tmp / "videos" / "p1"
    page.mkdir(parents=True, exist_ok=True)
    for n, vid in enumerate(ids):
        if not (page / f"{vid}.mp4").exists():
            shutil.copy(clips / f"{n % 4}.mp4", page / f"{vid}.mp4")
    return tmp / "videos"


def cfg_for(annotations: Path, videos: Path, out: Path, **kw) -> PreprocessConfig:
    values = {"annotations": str(annotations), "videos": str(videos), "output": str(out), "size": 32, **kw}
    return load_config(PreprocessConfig, values=values)


def samples(out: Path) -> list[tuple[str, str]]:
    return sorted((s["meta"]["videoid"], s["caption"]) for p in list_shards(out) for s in read_shard(p))


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(out)}


# ---- issue 11.1: resume keyed on content -----------------------------------------------------------


def test_changed_annotations_redo_their_shards_never_keep_stale_samples(ray_local, clips, tmp_path):
    tsv = tmp_path / "a.tsv"
    videos = videos_of(tmp_path, clips, ["1", "2", "3", "4", "5", "6"])
    out = tmp_path / "out"

    def write(rows):
        tsv.write_text("videoid\tpage_dir\tname\n" + "".join(f"{v}\tp1\t{c}\n" for v, c in rows))

    write([("1", "first clip"), ("2", "second clip"), ("3", "third clip")])
    run(cfg_for(tsv, videos, out, samples_per_shard=2))
    assert samples(out) == [("1", "first clip"), ("2", "second clip"), ("3", "third clip")]
    untouched = digests(out)["shard-000001.tar"]

    # same path, new rows in shard 0, shard 1 unchanged: shard 0 is redone, shard 1 kept
    write([("4", "a new clip"), ("5", "another new one"), ("3", "third clip")])
    summary = run(cfg_for(tsv, videos, out, samples_per_shard=2))
    assert samples(out) == [("3", "third clip"), ("4", "a new clip"), ("5", "another new one")]
    assert summary["resumed_rows"] == 1 and digests(out)["shard-000001.tar"] == untouched
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["videoid"] for r in index] == ["4", "5", "3"]

    # fewer rows: the shard past the end is dropped, not kept
    write([("6", "only this one")])
    summary = run(cfg_for(tsv, videos, out, samples_per_shard=2))
    assert samples(out) == [("6", "only this one")]
    assert summary["total"] == 1 and [p.name for p in list_shards(out)] == ["shard-000000.tar"]
    assert sorted(p.name for p in (out / "_parts").iterdir()) == ["shard-000000.parquet"]


# ---- issue 11.3: symlinks ----------------------------------------------------------------------------


def test_symlinks_leading_outside_the_videos_folder_escape(clips, tmp_path):
    videos = videos_of(tmp_path, clips, ["1"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(clips / "0.mp4", outside / "777.mp4")
    (videos / "p1" / "777.mp4").symlink_to(outside / "777.mp4")  # a linked file
    (videos / "linked").symlink_to(outside)  # a linked folder
    (videos / "p1" / "inside.mp4").symlink_to(videos / "p1" / "1.mp4")  # a link that stays inside

    def source(page: str, vid: str) -> dict:
        return {
            "row": 0,
            "videoid": vid,
            "caption": "c",
            "source": {"videos": str(videos), "page_dir": page, "videoid": vid},
        }

    for page, vid in (("p1", "777"), ("linked", "777")):
        with pytest.raises(DecodeFailure) as e:
            resolve_source(source(page, vid))
        assert e.value.reason == "path_escape", (page, vid)
    assert resolve_source(source("p1", "inside"))["path"] == os.path.realpath(videos / "p1" / "1.mp4")
    with pytest.raises(DecodeFailure) as e:  # a folder where a video should be
        (videos / "p1" / "adir.mp4").mkdir()
        resolve_source(source("p1", "adir"))
    assert e.value.reason == "not_a_file"


# ---- issue 11.4: captions that cleaning empties ----------------------------------------------------------


def test_caption_empty_after_cleaning_is_a_missing_caption(tmp_path):
    cfg = load_config(PreprocessConfig, values={"annotations": "a", "videos": "v", "output": str(tmp_path)})
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "1.mp4").write_bytes(b"x")
    for caption in ("...", "(*) !!! ~~~"):
        row = {
            "row": 0,
            "videoid": "1",
            "caption": caption,
            "source": {"videos": str(tmp_path), "page_dir": "p", "videoid": "1"},
        }
        failure = process_row(row, decoder=None, cfg=cfg)  # refused before the decoder is needed
        assert isinstance(failure, DecodeFailure) and failure.reason == "missing_caption", caption
    with pytest.raises(ConfigError, match="max_words"):
        load_config(
            PreprocessConfig,
            overrides=["caption.max_words=-1"],
            values={"annotations": "a", "videos": "v", "output": "o"},
        )


# ---- issue 11.14: one-line errors, bad CSV records ------------------------------------------------------


def test_bad_settings_and_unwritable_output_refused_before_work(ray_local, clips, tmp_path):
    videos = videos_of(tmp_path, clips, ["1"])
    csv = tmp_path / "a.csv"
    write_annotations(csv, [{"videoid": "1", "page_dir": "p1", "name": "a clip"}])
    for bad, key in (
        ("features.batch_size=0", "features.batch_size"),
        ("object_store_mb=10", "object_store_mb"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(
                PreprocessConfig,
                overrides=[bad],
                values={"annotations": str(csv), "videos": str(videos), "output": "o"},
            )
    locked = unwritable_folder(tmp_path)
    for out in (locked, locked / "shards"):
        with pytest.raises(ConfigError, match="cannot write in"):
            run(cfg_for(csv, videos, out))

    (tmp_path / "header_only.csv").write_text("videoid,page_dir,name\n")
    with pytest.raises(ConfigError, match="nothing to do"):
        run(cfg_for(tmp_path / "header_only.csv", videos, tmp_path / "out_empty"))
    assert not list((tmp_path / "out_empty").iterdir()), "nothing is left behind"


def test_csv_records_with_newlines_and_too_few_fields(clips, ray_local, tmp_path):
    videos = videos_of(tmp_path, clips, ["1", "2", "3"])
    lines = ["videoid,page_dir,name"]
    lines += [f"{9000 + i},p1,caption number {i}" for i in range(6000)]  # missing videos, fail fast
    lines[3000] = '3,p1,"a caption that\nspans two lines, far past the first block"'
    lines[4000] = "1,p1"  # too few fields
    lines.append('2,p1,"the last, ""quoted"" caption"')
    csv = tmp_path / "a.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = run(cfg_for(csv, videos, out, samples_per_shard=1000))
    assert summary["total"] == 6001 and summary["ok"] == 2
    assert summary["failures"] == {"missing_file": 5998, "malformed_record": 1}
    index = pq.read_table(out / "index.parquet").to_pandas()
    bad = index[index.reason == "malformed_record"].iloc[0]
    assert "2 fields, expected 3" in bad.message and "'1,p1'" in bad.message
    spans = "a caption that\nspans two lines, far past the first block"
    expected = [
        ("2", clean_caption('the last, "quoted" caption', CaptionCleaning())),
        ("3", clean_caption(spans, CaptionCleaning())),
    ]
    assert samples(out) == expected
    # the malformed record is accounted after the file's rows (row 6000, shard 6, which has no ok row)
    assert [p.name for p in list_shards(out)] == ["shard-000002.tar", "shard-000005.tar"], (
        "no empty shard files"
    )
    assert index.iloc[6000].reason == "malformed_record"
    assert not (out / "_staging").exists() and not (out / "_plan.arrow").exists()


def test_streamed_tsv_matches_its_rows(tmp_path):
    (tmp_path / "a.tsv").write_text("videoid\tname\tpage_dir\n1\tx, y\tp\n2\t\tp\n")
    rows = [r for b in stream_csv(tmp_path / "a.tsv") for r in b.to_pylist()]
    assert [(r["videoid"], r["page_dir"], r["caption"]) for r in rows] == [
        ("1", "p", "x, y"),
        ("2", "p", None),
    ]


# ---- issue 11.10: local Ray listens on loopback only -------------------------------------------------------


def test_local_ray_listens_on_loopback_only(ray_local):
    @ray_local.remote
    def pid() -> int:
        return os.getpid()

    ray_local.get([pid.remote() for _ in range(4)])  # workers up
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    listening = [
        c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours
    ]
    assert len(listening) >= 3, "the GCS, the raylet and the workers listen"
    exposed = [(psutil.Process(c.pid).name(), c.laddr.ip) for c in listening if not _loopback(c.laddr.ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def _loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1") or ip.startswith(("127.", "::ffff:127."))


# ---- issue 14.2: work units -------------------------------------------------------------------------------


def test_work_units_follow_cores_not_shard_size():
    two = [ShardPlan(0, 0, 256, "a"), ShardPlan(1, 256, 44, "b")]  # 300 rows at the default shard size
    units = plan_units(two, cpus=2)
    assert len(units) >= 2 * 8 and max(u.hi - u.lo for u in units) <= 10
    for shard in (0, 1):  # each shard's units tile its rows exactly
        mine = [u for u in units if u.shard == shard]
        assert mine[0].lo == 0 and mine[-1].hi == two[shard].rows
        assert all(a.hi == b.lo for a, b in zip(mine, mine[1:], strict=False))
        assert {u.units for u in mine} == {len(mine)}
    assert [(u.shard, u.lo, u.hi) for u in plan_units(two, cpus=1)] == [(0, 0, 256), (1, 0, 44)]
    many = [ShardPlan(i, i * 256, 256, str(i)) for i in range(64)]
    assert len(plan_units(many, cpus=2)) == 64, "enough shards: whole shards, nothing to join"
    huge = plan_units([ShardPlan(i, i * 256, 256, str(i)) for i in range(41_800)], cpus=64)
    groups = group_units(huge)  # WebVid-10M: the driver's Ray Data state stays bounded
    assert len(groups) <= MAX_TASKS and [u for g in groups for u in g] == huge


def test_split_shards_are_byte_identical_to_whole_ones(ray_local, clips, tmp_path, monkeypatch):
    import preprocess.job

    ids = [str(i) for i in range(10)]
    videos = videos_of(tmp_path, clips, ids)
    rows = [{"videoid": v, "page_dir": "p1", "name": f"clip {v}"} for v in ids]
    rows[4]["videoid"] = "missing"
    write_annotations(tmp_path / "a.csv", rows)
    split = run(cfg_for(tmp_path / "a.csv", videos, tmp_path / "split", samples_per_shard=6))
    monkeypatch.setattr(preprocess.job, "UNITS_PER_WORKER", 0)  # whole shards only
    whole = run(cfg_for(tmp_path / "a.csv", videos, tmp_path / "whole", samples_per_shard=6))
    assert split["timing"]["units"] > whole["timing"]["units"] == 2
    assert (
        digests(tmp_path / "split") == digests(tmp_path / "whole") and len(digests(tmp_path / "whole")) == 2
    )
    assert pq.read_table(tmp_path / "split" / "index.parquet").equals(
        pq.read_table(tmp_path / "whole" / "index.parquet")
    )


def test_progress_shows_every_failure_reason_or_how_many_others():
    reasons = {
        "missing_file": 9,
        "decode_error": 3,
        "too_short": 2,
        "empty_file": 1,
        "path_escape": 1,
        "x": 1,
    }
    line = format_reasons(reasons)
    assert line == "missing_file=9, decode_error=3, too_short=2, empty_file=1, +2 other"
    assert format_reasons({"a": 1}) == "a=1"


def test_preprocessing_driver_does_not_load_torch():
    """torch + transformers cost the driver ~300 MB and seconds of start-up it never uses."""
    code = (
        "import sys; from pipeline.config import load_config; from preprocess.config import PreprocessConfig;"
        "import preprocess.job, cli;"
        "load_config(PreprocessConfig, values={'annotations': 'a', 'videos': 'v', 'output': 'o'});"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_warm_worker_starts_the_decoder_child_the_first_unit_uses(clips, tmp_path):
    """The warm-up task leaves a running decoder child in the worker process, and the job's rows
    are then decoded by that same child (no second start)."""
    from preprocess.steps import process_rows, shared_decoder, warm_worker

    cfg = cfg_for(tmp_path / "a.csv", videos_of(tmp_path, clips, ["0"]), tmp_path / "out")
    decoder = shared_decoder(cfg)
    try:
        assert warm_worker(cfg) == os.getpid()
        child = decoder.proc
        assert child is not None and child.poll() is None
        row = {
            "row": 0,
            "videoid": "0",
            "caption": "a clip",
            "source": {"videos": cfg.videos, "page_dir": "p1", "videoid": "0"},
        }
        (index,) = process_rows(0, [row], tmp_path / "s.tar", cfg)
        assert index["status"] == "ok" and decoder.proc is child and decoder.restarts == 0
    finally:
        decoder.close()


def test_shutdown_ray_stops_a_local_cluster_it_started_and_kills_its_monitor_first():
    """``shutdown_ray`` kills the autoscaler monitor itself (SIGKILL, no 1 s grace) and leaves no node
    process behind; given a cluster it did not start, it leaves Ray running."""
    code = """
import json, psutil, ray
from pipeline.raycluster import init_ray, shutdown_ray
from ray._private import ray_constants, worker
owned = init_ray(None, 1, object_store_mb=100)
_global_node = worker._global_node
procs = [i.process for infos in _global_node.all_processes.values() for i in infos]
monitor = _global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
shutdown_ray(False)
alive_after_not_owned = ray.is_initialized()
seen, ray_shutdown = [], ray.shutdown
ray.shutdown = lambda: (seen.append(monitor.poll()), ray_shutdown())
shutdown_ray(owned)
print(json.dumps({"owned": owned, "kept": alive_after_not_owned, "monitor": seen,
                  "left": [p.pid for p in procs if psutil.pid_exists(p.pid) and p.poll() is None]}))
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"owned": True, "kept": True, "monitor": [-9], "left": []}  # dead before ray.shutdown
