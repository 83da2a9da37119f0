"""Preprocessing input and configuration faults that used to abort the job or blame the videos
(issue 21, items 12 and 16): NUL bytes in path fields, impossible sizes, a run of identical failures,
a negative limit, duplicate columns, duplicate videoids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from preprocess.config import PreprocessConfig
from preprocess.job import run
from tests.conftest import write_annotations


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two short clips in videos/p1/."""
    from standins.sample_data import write_clip

    page = tmp_path_factory.mktemp("nul") / "videos" / "p1"
    page.mkdir(parents=True)
    for i in range(2):
        write_clip(page / f"{i}.mp4", 1.0, width=96, height=64, fps=10, seed=i)
    return page.parent


def _cfg(out: Path, **values) -> PreprocessConfig:
    return load_config(PreprocessConfig, values={"output": str(out), "size": 32, **values})


@pytest.mark.slow  # two Ray jobs
def test_a_nul_byte_in_a_path_field_is_a_failed_row(ray_local, videos, tmp_path):
    """A NUL in a CSV videoid or page_dir, or in a VideoChat record's video, used to end the whole job
    in a Ray traceback (embedded null byte) with no shard written."""
    csv = tmp_path / "a.csv"
    rows = [{"videoid": "0", "page_dir": "p1", "name": "a good clip"}]
    rows += [{"videoid": "1\0x", "page_dir": "p1", "name": "nul videoid"}]
    rows += [{"videoid": "1", "page_dir": "p1\0", "name": "nul page_dir"}]
    write_annotations(csv, rows)
    summary = run(_cfg(tmp_path / "csv", annotations=str(csv), videos=str(videos)))
    assert (summary["ok"], summary["failures"]) == (1, {"invalid_path": 2})
    index = pq.read_table(tmp_path / "csv" / "index.parquet").to_pylist()
    assert [r["reason"] for r in index] == [None, "invalid_path", "invalid_path"]
    assert "contains a NUL byte" in index[1]["message"] and index[1]["videoid"] == "1\0x"

    records = [{"video": f"p1/{v}", "QA": [{"q": "what?", "a": "a clip"}]} for v in ("0.mp4", "1\0.mp4")]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(records))
    summary = run(_cfg(tmp_path / "chat", dataset="videochat", annotations=str(chat), videos=str(videos)))
    assert (summary["ok"], summary["failures"]) == (1, {"invalid_path": 1})


def test_impossible_sizes_a_negative_limit_and_two_name_columns_are_refused_up_front(videos, tmp_path):
    """--size 100000 and decode_memory_mb=150 used to fail every row as decode_error (and exit 0);
    --limit -1 was taken; a second name column silently lost to the first."""
    from click.testing import CliRunner

    import cli

    csv = tmp_path / "a.csv"
    write_annotations(csv, [{"videoid": "0", "page_dir": "p1", "name": "a clip"}])
    inputs = [
        "preprocess",
        "--annotations",
        str(csv),
        "--videos",
        str(videos),
        "--output",
        str(tmp_path / "o"),
    ]
    for args, says in (
        (["--size", "100000"], "8 frames of 100000x100000 px need about 915,867 MB in the decoder"),
        (["decode_memory_mb=150"], "more than decode_memory_mb=150"),
        (["--size", "4096", "decode_memory_mb=1000"], "need about 1,876 MB"),  # measured: fails under 1000
        (["--limit", "-1"], "limit: -1 must be >= 1"),
        (["--limit", "0"], "limit: 0 must be >= 1"),
    ):
        r = CliRunner().invoke(cli.main, [*inputs, *args])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and says in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    for ok in ({"size": 2048, "decode_memory_mb": 1000}, {"size": 224, "decode_memory_mb": 400}):
        _cfg(tmp_path / "o", annotations=str(csv), videos=str(videos), **ok)  # measured to decode
    (tmp_path / "two.csv").write_text("videoid,page_dir,name,name\n0,p1,first,second\n")
    with pytest.raises(ConfigError, match=r"has 2 'name' columns"):
        run(_cfg(tmp_path / "o2", annotations=str(tmp_path / "two.csv"), videos=str(videos)))


@pytest.mark.slow  # a Ray job
def test_duplicate_videoids_are_kept_and_flagged(ray_local, videos, tmp_path):
    csv = tmp_path / "a.csv"
    rows = [
        {"videoid": "0", "page_dir": "p1", "name": "a clip"},
        {"videoid": "1", "page_dir": "p1", "name": "b"},
    ]
    rows.append({"videoid": "0", "page_dir": "p1", "name": "the same clip, another caption"})
    write_annotations(csv, rows)
    summary = run(_cfg(tmp_path / "o", annotations=str(csv), videos=str(videos)))
    assert summary["ok"] == 3
    flagged = {"videoids": 1, "rows": 2, "examples": {"0": 2}}
    assert summary["duplicate_videoids"] == flagged
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["duplicate_videoids"] == flagged
    from preprocess.job import format_summary

    assert "1 videoids occur in more than one row (2 rows, all kept)" in format_summary(summary)


@pytest.mark.slow  # a Ray job
def test_a_run_of_identical_decoding_failures_stops_as_a_configuration_fault(ray_local, videos, tmp_path):
    """min_frames=500: every clip is too short. The job used to decode all of them and report 0/N ok."""
    csv = tmp_path / "a.csv"
    write_annotations(csv, [{"videoid": str(i % 2), "page_dir": "p1", "name": f"c{i}"} for i in range(80)])
    cfg = _cfg(tmp_path / "o", annotations=str(csv), videos=str(videos), min_frames=500, config_check_rows=8)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    message = str(e.value)
    assert message.startswith("stopped: the first ") and "rows all failed as too_short" in message
    assert "probably the configuration" in message and "min_frames=500" in message and "\n" not in message
    assert not (tmp_path / "o" / "summary.json").exists()
    shutil.rmtree(tmp_path / "o")
    cfg = _cfg(tmp_path / "o", annotations=str(csv), videos=str(videos), min_frames=500, config_check_rows=0)
    summary = run(cfg)  # 0: goes on regardless
    assert (summary["ok"], summary["failures"]) == (0, {"too_short": 80})
