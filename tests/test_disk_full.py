"""A full disk during preprocessing or training (issue 21, item 15): one line, "no space left on device
at PATH", not a Ray traceback or torch's "unexpected pos"; committed work stays valid. The disk is a
real small tmpfs (ENOSPC from the kernel), so these tests need root and mount; skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, run_train, write_annotations


@pytest.fixture
def small_disk(tmp_path_factory):
    """A folder on its own 1 MiB tmpfs."""
    mnt = Path(f"/tmp/vlp-small-disk-{uuid.uuid4().hex[:8]}")  # not under tmp_path: pytest cleans that
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode
    ):
        mnt.rmdir()
        pytest.skip("needs root and mount for a small tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)
    mnt.rmdir()


@pytest.mark.slow  # a Ray job
def test_preprocess_on_a_full_disk_says_so_in_one_line(small_disk, tmp_path):
    from standins.sample_data import write_clip

    page = tmp_path / "videos" / "p1"
    page.mkdir(parents=True)
    for i in range(3):
        write_clip(page / f"{i}.mp4", 1.0, width=96, height=64, fps=10, seed=i)
    write_annotations(
        tmp_path / "a.csv", [{"videoid": str(i), "page_dir": "p1", "name": f"c{i}"} for i in range(3)]
    )
    out = small_disk / "shards"  # 224 px: 1.2 MB of frames per clip, more than the disk holds
    args = ["preprocess", "--annotations", str(tmp_path / "a.csv"), "--videos", str(tmp_path / "videos")]
    r = subprocess.run(
        [sys.executable, "cli.py", *args, "--output", str(out), "--workers", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        timeout=600,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: no space left on device at {out}"), last
    assert not list(out.glob(".*.tmp-*")) and not list(out.glob("shard-*")), "no partial shard is left"


@pytest.mark.slow  # a training run
def test_train_on_a_full_disk_says_so_in_one_line(corpus_shards, small_disk, tmp_path):
    from train.checkpoint import complete_checkpoints

    run_dir = small_disk / "run"
    tracking = f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"  # the disk holds only the run folder
    r = run_train(
        1, f"data.shards={corpus_shards}", f"run_dir={run_dir}", "max_steps=2", tracking, check=False
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "unexpected pos" not in r.stderr, r.stderr[
        -3000:
    ]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: no space left on device at {run_dir}/checkpoints/step_00000002"), last
    assert complete_checkpoints(run_dir) == [], "the partial checkpoint is never taken for a complete one"
