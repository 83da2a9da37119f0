"""Preprocessing input and configuration faults that used to abort the job or blame the videos
(issue 21, items 12 and 16): NUL bytes in path fields, impossible sizes, a run of identical failures,
a negative limit, duplicate columns, duplicate videoids."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
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
