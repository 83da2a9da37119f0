"""Run-folder trust (issue 21): a non-finite step stops the run (or is skipped, within a budget) and no
checkpoint holds it; one writer per run/output folder; an unfinished preprocess folder, a tampered or
non-finite export are refused; a tracking server that is down costs no training; a finished run rerun
says so."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError, load_config
from pipeline.model import VideoLLaMA, tiny
from pipeline.weights import WeightsError, convert, load_trainable_weights
from tests.conftest import REPO, SHORT_RUN, TINY, losses, run_train
from train import checkpoint
from train.config import TrainConfig


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY, ["micro_batch=2", *overrides])


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed."""
    code = (
        "import sys, time\nfrom pipeline.folderlock import folder_lock\n"
        f"with folder_lock({str(folder)!r}, 'x', 'test'):\n    print('locked', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))


# ---- 1: non-finite steps ------------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_step_stops_without_a_checkpoint_and_skip_budget(frame_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"data.shards={frame_shards}",
        f"run_dir={run_dir}",
        "optim.init_lr=1e6",
        "optim.warmup_lr=1e6",
        "optim.warmup_steps=1",
        "max_steps=6",
        "save_every=1",
        "tracking=false",
    ]
    p = run_train(1, *args, check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert err.startswith("Error: step 2: non-finite loss nan") and "newest checkpoint: step_00000001" in err
    assert [c.name for c in checkpoint.complete_checkpoints(run_dir)] == ["step_00000001"]
    assert not (run_dir / "export").exists()
    loss = losses(run_dir)
    assert sorted(loss) == [1, 2] and loss[1] == loss[1] and loss[2] != loss[2]  # step 2's loss is NaN

    # rerun with a budget of one skip: step 2 skipped (its update not applied), step 3 stops the run
    p = run_train(1, *args, "optim.skip_nonfinite=1", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "[train] warning: step 2: non-finite (loss nan" in p.stdout and "(1 of at most 1" in p.stdout
    assert p.stderr.strip().splitlines()[-1].startswith("Error: step 3: non-finite loss nan")
    names = [c.name for c in checkpoint.complete_checkpoints(run_dir)]
    assert names == ["step_00000001", "step_00000002"]  # the skipped step left the weights as they were
    one, two = (load_file(run_dir / "checkpoints" / n / "export" / "trainable.safetensors") for n in names)
    assert all(torch.equal(one[k], two[k]) for k in one)
    state = json.loads((run_dir / "checkpoints" / names[1] / "train_state.json").read_text())
    assert state["skipped"]["nonfinite"] == 1


def test_nonfinite_weights_are_not_resumed_from_nor_loaded(short_frames_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(short_frames_run, run_dir)
    (ckpt,) = checkpoint.complete_checkpoints(run_dir)
    weights = ckpt / "export" / "trainable.safetensors"
    sd = load_file(weights)
    sd["llama_proj.bias"][0] = float("nan")
    save_file(sd, weights)
    with pytest.raises(checkpoint.BrokenCheckpoint, match="llama_proj.bias"):
        checkpoint.resume_point(run_dir, 0)

    export = tmp_path / "export"  # a copy without the checkpoint's digests: the values are what is refused
    shutil.copytree(ckpt / "export", export)
    with pytest.raises(WeightsError, match=r"non-finite weights \(NaN or inf in llama_proj.bias\)"):
        load_trainable_weights(VideoLLaMA(tiny()), export)


# ---- 2, 3: one writer per folder ----------------------------------------------------------------


def test_second_train_on_a_run_dir_is_refused_and_a_killed_holder_never_blocks(frame_shards, tmp_path):
    from pipeline.folderlock import folder_lock
    from train.loop import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = _hold_lock(run_dir)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as e:
            run(_cfg(f"data.shards={frame_shards}", f"run_dir={run_dir}", *SHORT_RUN))
        assert time.monotonic() - t0 < 5
        msg = str(e.value)
        assert f"PID {holder.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
        assert not (run_dir / "config.yaml").exists()  # refused before anything was written
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    with folder_lock(run_dir, "run_dir", "train"):  # SIGKILLed: the kernel released it at once
        assert f"PID {os.getpid()}" in (run_dir / ".lock").read_text()


def test_requeued_job_waits_for_its_predecessor_to_release_the_lock(tmp_path, monkeypatch):
    from pipeline.folderlock import folder_lock, requeue_wait_s

    assert requeue_wait_s() == 0.0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeue_wait_s() == 120.0
    holder = _hold_lock(tmp_path)
    threading.Timer(1.0, lambda: os.killpg(holder.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with folder_lock(tmp_path, "run_dir", "train", wait_s=requeue_wait_s()):
        waited = time.monotonic() - t0
    holder.wait()
    assert 0.9 < waited < 60


def test_second_preprocess_into_an_output_is_refused(frame_corpus, tmp_path):
    from preprocess.config import PreprocessConfig
    from preprocess.job import run

    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        cfg = load_config(
            PreprocessConfig,
            values={
                "annotations": frame_corpus["annotations"],
                "videos": frame_corpus["videos"],
                "output": str(out),
            },
        )
        with pytest.raises(ConfigError, match=f"PID {holder.pid} on host"):
            run(cfg)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing planned, nothing written
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


# ---- 5: unfinished preprocess output ------------------------------------------------------------


def test_unfinished_preprocess_output_is_refused_unless_allowed(frame_shards, tmp_path, capsys):
    from train.loop import check_data

    crashed = tmp_path / "crashed"
    shutil.copytree(frame_shards, crashed)
    (crashed / "shard-000003.tar").unlink()
    (crashed / "index.parquet").unlink()
    (crashed / "summary.json").unlink()
    (crashed / "_plan.arrow").write_bytes(b"")
    (crashed / "_staging").mkdir()
    cfg = _cfg(f"data.shards={crashed}")
    with pytest.raises(ConfigError) as e:
        check_data(cfg, cfg.model)
    msg = str(e.value)
    assert "did not finish (_plan.arrow present, _staging present, no index.parquet, no summary.json)" in msg
    assert "rerun the same preprocess command" in msg and "\n" not in msg

    allowed = _cfg(f"data.shards={crashed}", "data.allow_unfinished=true")
    datasets, kind = check_data(allowed, allowed.model)
    assert kind == "frames" and len(datasets[0][0]) == 3
    assert "warning: data:" in capsys.readouterr().out

    finished = _cfg(f"data.shards={frame_shards}")  # the job's own, finished folder trains as before
    assert len(check_data(finished, finished.model)[0][0][0]) == 4


# ---- 6: the export's digests --------------------------------------------------------------------


def test_tampered_export_is_refused_by_caption_init_from_and_convert(short_frames_run, tmp_path):
    from infer.load import ModelSource, load

    run_dir = tmp_path / "run"
    shutil.copytree(short_frames_run, run_dir)
    assert load(ModelSource(checkpoint=str(run_dir))).resolved.weights == run_dir / "export"  # intact: loads

    final = run_dir / "export" / "trainable.safetensors"
    _flip_last_byte(final)
    with pytest.raises(WeightsError) as e:
        load(ModelSource(checkpoint=str(run_dir)))  # caption, chat and serve load through here
    assert str(e.value).startswith(f"{final} does not hold the bytes it was written with")
    assert f"{run_dir / 'COMPLETE'}" in str(e.value)
    with pytest.raises(WeightsError, match="does not hold the bytes"):
        convert(run_dir / "export", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()

    (ckpt,) = checkpoint.complete_checkpoints(run_dir)
    _flip_last_byte(ckpt / "export" / "trainable.safetensors")
    pattern = (
        f"{re.escape(str(ckpt / 'export'))}.* does not hold the bytes .*{re.escape(str(ckpt / 'COMPLETE'))}"
    )
    with pytest.raises(WeightsError, match=pattern):
        load_trainable_weights(VideoLLaMA(tiny()), ckpt / "export")  # stage 2's init_from


# ---- 17: a finished run, checkpoints pruned -------------------------------------------------------


def test_rerun_of_a_finished_run_without_checkpoints_says_complete(
    short_frames_run, frame_shards, tmp_path, capsys
):
    from train.loop import run

    run_dir = tmp_path / "run"
    shutil.copytree(short_frames_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    before = {p: p.read_bytes() for p in (run_dir / "export").iterdir()}
    metrics = (run_dir / "metrics.jsonl").read_text()
    summary = run(_cfg(f"data.shards={frame_shards}", f"run_dir={run_dir}", *SHORT_RUN))
    out = capsys.readouterr().out
    assert (
        f"[train] {run_dir} is complete: trained 3 of max_steps 3 steps; export: {run_dir / 'export'}" in out
    )
    assert summary["already_complete"] and summary["steps"] == 3 and summary["loss"] == losses(run_dir)[3]
    assert (run_dir / "metrics.jsonl").read_text() == metrics and not (run_dir / "checkpoints").exists()
    assert {p: p.read_bytes() for p in (run_dir / "export").iterdir()} == before
    (run_dir / "COMPLETE").unlink()  # a run finished before the record existed: its metrics say it
    assert run(_cfg(f"data.shards={frame_shards}", f"run_dir={run_dir}", *SHORT_RUN))["already_complete"]

    # more steps cannot continue without a checkpoint, and must not restart over the export
    longer = [a for a in SHORT_RUN if not a.startswith("max_steps")] + ["max_steps=5"]
    with pytest.raises(
        ConfigError, match="finished at step 3 .* without checkpoints to continue it to step 5"
    ):
        run(_cfg(f"data.shards={frame_shards}", f"run_dir={run_dir}", *longer))
    assert (run_dir / "metrics.jsonl").read_text() == metrics


# ---- 11: the tracking server --------------------------------------------------------------------


def test_tracking_server_down_is_one_line_in_seconds(frame_shards, tmp_path):
    from train.loop import run

    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        run(_cfg(f"data.shards={frame_shards}", f"run_dir={run_dir}", "tracking_uri=http://127.0.0.1:9"))
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert msg.startswith("tracking_uri: no MLflow server answers at http://127.0.0.1:9") and "\n" not in msg
    assert "tracking=false" in msg and not (run_dir / "config.yaml").exists()


def test_something_other_than_mlflow_at_the_tracking_uri_is_refused():
    """A proxy or another web server answers 404 at /health: not taken for a tracking server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipeline.tracking import TrackingUnavailable, check_server

    class NotMlflow(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404 if self.path == "/health" else 200)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(TrackingUnavailable, match=f"{uri} answers HTTP 404 at /health"):
            check_server(uri)
        server.shutdown()


def test_steps_the_store_missed_are_backfilled_at_the_next_start(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import make_tracker
    from train.loop import unlogged_rows

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 7)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tracker = make_tracker(True, True, run_dir, "exp")
    for r in rows[:2]:  # the store got steps 1-2, then went away
        tracker.log_metrics({k: v for k, v in r.items() if k != "step"}, r["step"])
    tracker.close("KILLED")

    again = make_tracker(True, True, run_dir, "exp")
    again.skip_logged_steps()
    assert again.logged_step() == 2
    todo = unlogged_rows(run_dir, again.logged_step(), log_every=2, last=5)
    assert [r["step"] for r in todo] == [4, 5, 6]  # every log_every-th step and the last, past step 2
    again.backfill(todo)
    again.close()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    history = client.get_metric_history(again.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in (1, 2, 4, 5, 6)]


def _mlflow_server(port: int, db: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{db}"],
        cwd=db.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300  # minutes on a loaded machine
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            _stop(server)  # never left running behind a failed test
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # stopped already
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.mark.slow
def test_server_lost_mid_run_costs_seconds_and_is_backfilled_when_back(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri, db = f"http://127.0.0.1:{port}", tmp_path / "server.db"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    server = _mlflow_server(port, db)
    try:
        tracker = tracking.make_tracker(True, True, run_dir, "exp", uri)

        def step(n: int) -> float:
            with open(metrics, "a") as f:
                f.write(json.dumps({"step": n, "loss": float(n)}) + "\n")
            t0 = time.monotonic()
            tracker.log_metrics({"loss": float(n)}, n)
            return time.monotonic() - t0

        step(1)
        _stop(server)
        assert step(2) < 15 and step(3) < 1  # one failed try, then none until RETRY_S has passed
        out = capsys.readouterr().out
        assert out.count(f"[tracking] warning: MLflow at {uri} does not answer") == 1
        server = _mlflow_server(port, db)
        monkeypatch.setattr(tracking, "RETRY_S", 0.0)
        tracker.next_try = 0.0
        step(4)
        assert "answers again: logged 3 missed steps" in capsys.readouterr().out
        tracker.close()
        client = MlflowClient(uri)
        assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
            (n, float(n)) for n in (1, 2, 3, 4)
        ]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        _stop(server)
