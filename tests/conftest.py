"""Shared fixtures and helpers: a local Ray cluster, small WebVid-layout corpora made in the tests, the
shard sets and the short training run that several modules use (made once per session), and the way
every test starts a training process."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stage1_tiny.yaml"
TINY_SIZE = 56  # the tiny preset's image size: shards for it are preprocessed at this size
# 3 steps without warm-up or tracking: enough to compare two inputs step by step
# no training-time crop: runs on frames and on cached features of the same clips must agree
SHORT_RUN = (
    "max_steps=3",
    "save_every=100",
    "tracking=false",
    "optim.warmup_steps=0",
    "data.random_crop=false",
)


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
    from standins.sample_data import write_clip

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


# ---- training processes ----------------------------------------------------------------------------


def train_env(**extra: str) -> dict[str, str]:
    """One thread per process, unbuffered output, and the run's own MLflow store (never a server the
    calling shell points at)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def train_cmd(nproc: int, *overrides: str, config: Path = TINY) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    # the shipped stage-1 config's micro-batch of 16 is sized for the 264-clip grounded corpus; the tests'
    # shard sets hold a few dozen clips, so they train with 2 unless a test says otherwise (later wins)
    small = ["micro_batch=2"] if config == TINY else []
    return [*launcher, str(REPO / "cli.py"), "train", "--config", str(config), *small, *overrides]


def run_train(
    nproc: int, *overrides: str, config: Path = TINY, env=None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Train in a new process group, so a timeout kills torchrun's ranks too, not only the launcher (left
    running, they would slow every later test)."""
    cmd = train_cmd(nproc, *overrides, config=config)
    with subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.communicate()
            raise
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def kill_tree(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Kill a process started with ``start_new_session=True`` and everything under it, at once, as a lost
    node does. Its process group is not enough: torchrun starts each rank in a session of its own, so
    ``os.killpg`` on the launcher leaves the ranks training on (and holding the run folder's lock)."""
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    if sig == signal.SIGKILL:
        psutil.wait_procs(tree, timeout=30)  # gone (their locks released) before the caller goes on


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


# ---- data and runs shared across modules (one per session) ------------------------------------------


def preprocess(corpus: dict, out: Path, **values) -> dict:
    """The real preprocessing job on ``corpus`` at the tiny preset's size; returns its summary."""
    from pipeline.config import load_config
    from preprocess.config import PreprocessConfig
    from preprocess.job import run

    inputs = {"annotations": corpus["annotations"], "videos": corpus["videos"], "output": str(out)}
    return run(load_config(PreprocessConfig, values={**inputs, "size": TINY_SIZE, **values}))


def _shards(factory, name: str, corpus: dict, per_shard: int, ok: int) -> Path:
    out = factory.mktemp(name) / "shards"
    assert preprocess(corpus, out, samples_per_shard=per_shard, workers=2)["ok"] == ok
    return out


@pytest.fixture(scope="session")
def corpus_shards(ray_local, corpus, tmp_path_factory) -> Path:
    """The session corpus (6 good clips + one row of every failure class) -> webdataset shards of 4."""
    return _shards(tmp_path_factory, "corpus_shards", corpus, per_shard=4, ok=6)


@pytest.fixture(scope="session")
def frame_corpus(tmp_path_factory) -> dict:
    """8 good clips, no faults: the training corpus."""
    return build_corpus(tmp_path_factory.mktemp("frame_corpus"), good=8, bad=False)


@pytest.fixture(scope="session")
def frame_shards(ray_local, frame_corpus, tmp_path_factory) -> Path:
    """``frame_corpus`` -> 4 webdataset shards of 2 clips, 8 frames each, by the real job."""
    return _shards(tmp_path_factory, "frame_shards", frame_corpus, per_shard=2, ok=8)


@pytest.fixture(scope="session")
def short_frames_run(frame_shards, tmp_path_factory) -> Path:
    """SHORT_RUN on ``frame_shards``: the reference that runs on cached features must match."""
    out = tmp_path_factory.mktemp("short_frames_run") / "run"
    run_train(1, f"data.shards={frame_shards}", f"run_dir={out}", *SHORT_RUN)
    return out
