"""Stage-1 training end to end on CPU: real preprocessing, real launcher (torchrun), DeepSpeed ZeRO-2 over
gloo, MLflow on SQLite and on a real ``mlflow server``; tiny model, 56 px frames, a few steps."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.augment import random_resized_crop
from pipeline.config import ConfigError, load_config
from pipeline.model import TRAINABLE, VideoLLaMA, clip_from_frames, encoder_weights_fingerprint, tiny
from pipeline.prompts import prepare_tokenizer
from pipeline.shards import ShardWriter, inspect_shards, list_shards, read_shard
from pipeline.tiny import tiny_tokenizer
from pipeline.weights import load_trainable
from tests.conftest import REPO, SHORT_RUN, TINY, kill_tree, losses, run_train, train_cmd, train_env
from train import checkpoint
from train.config import OptimConfig, TrainConfig
from train.data import TrainStream, advance, check_encoder_weights, make_loader, shard_counts
from train.engine import ds_config, lr_at, param_groups


@pytest.fixture(scope="module")
def shards(frame_shards):
    """8 clips -> 4 webdataset shards of 8 frames at the tiny preset's 56 px (conftest, once per session)."""
    return frame_shards


def write_feature_shards(frames_dir: Path, out: Path, fingerprint: str | None = None) -> Path:
    """The same samples as ``frames_dir`` with cached features (fp16 [T,32,D]) from the seeded tiny encoder,
    as Arrow shards: the second shard format."""
    torch.manual_seed(42)  # = the training seed: the same frozen encoder as the run builds
    model = VideoLLaMA(tiny()).eval()
    out.mkdir(parents=True)
    weights = encoder_weights_fingerprint(model)
    identity = (
        f"{fingerprint or model.cfg.encoder_fingerprint()}-{weights}"  # as preprocess.features records it
    )
    (out / "_encoder.json").write_text(json.dumps({"encoder": identity}))
    for path in sorted(frames_dir.glob("shard-*.tar")):
        writer = ShardWriter(out / (path.stem + ".arrow"), "arrow")
        for s in read_shard(path):
            clip = clip_from_frames(torch.from_numpy(s["frames"])[None])
            feats = model.encode_frames(clip)[0].to(torch.float16).numpy()
            writer.write({"key": s["key"], "caption": s["caption"], "meta": s["meta"], "features": feats})
        writer.commit()
    return out


# ---- pieces ------------------------------------------------------------------------------------


def test_schedule_is_the_originals_linear_warmup_cosine():
    """Values worked out by hand from LinearWarmupCosineLRScheduler (video_llama/common/optims.py)."""
    o = OptimConfig(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=10)
    assert lr_at(0, o, 100) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(5, o, 100) == pytest.approx(5.05e-5, rel=1e-12)  # 1e-6 + 9.9e-5 * 5/10
    # the cosine counts from step 0, warm-up included: cos(pi * 10/100) = 0.95105651629515357
    assert lr_at(10, o, 100) == pytest.approx(9.9510565162951536e-5, rel=1e-12)
    assert lr_at(50, o, 100) == pytest.approx(9e-5, rel=1e-12)  # cos(pi/2) = 0
    # 4 micro-batches per optimizer step: the warm-up spans 40 iterations, the cosine 400
    assert lr_at(39, o, 400, accum=4) == pytest.approx(9.7525e-5, rel=1e-12)  # 1e-6 + 9.9e-5 * 39/40
    assert lr_at(40, o, 400, accum=4) == pytest.approx(9.9510565162951536e-5, rel=1e-12)
    # the warm-up is capped at init_lr: min(init, warmup_lr + ...)
    assert lr_at(0, OptimConfig(init_lr=1e-4, warmup_lr=2e-4, warmup_steps=10), 100) == 1e-4


def test_only_trainable_params_optimised_with_decay_on_matrices():
    torch.manual_seed(0)
    model = VideoLLaMA(tiny())
    decay, no_decay = param_groups(model, 0.05)
    trainable = {id(p) for _, p in model.trainable_parameters()}
    got = decay["params"] + no_decay["params"]
    assert {id(p) for p in got} == trainable and len(got) == len(trainable)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.split(".")[0] in TRAINABLE for n in names)


def test_ds_config_batch_sizes_from_typed_config(tmp_path):
    cfg = load_config(
        TrainConfig, TINY, [f"data.shards={tmp_path}", "micro_batch=3", "grad_accum=4", "optim.grad_clip=1.0"]
    )
    ds = ds_config(cfg, "bf16", world_size=8, on_gpu=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 4)
    assert ds["train_batch_size"] == 96 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(ds)
    assert not ds_config(cfg, "fp32", 2, on_gpu=False)["bf16"]["enabled"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="max_step"):
        load_config(TrainConfig, TINY, ["max_step=3"])
    with pytest.raises(ConfigError, match="model.*vision_widht"):
        load_config(TrainConfig, TINY, ["model.vision_widht=3"])
    with pytest.raises(ConfigError, match="data.shards or data.datasets"):
        load_config(TrainConfig, TINY, [f"data.datasets=[{{shards: {tmp_path}}}]"])
    with pytest.raises(ConfigError, match="data.workers must be >= 0"):
        load_config(TrainConfig, TINY, [f"data.shards={tmp_path}", "data.workers=-1"])


def test_first_deepspeed_run_says_it_compiles(tmp_path, monkeypatch):
    """The 25-70 s JIT build of DeepSpeed's CPU comm op is announced only when it is still to come."""
    from pipeline.distributed import comm_op_build_pending

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert comm_op_build_pending() == str(tmp_path / "deepspeed_shm_comm")
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"built")
    assert comm_op_build_pending() is None


def _stream(datasets, start_step=0, consumed=None, rank=0, world_size=2, grad_accum=1):
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    return TrainStream(
        datasets,
        kind="frames",
        tokenizer=tok,
        mcfg=tiny(),
        micro_batch=2,
        grad_accum=grad_accum,
        max_caption_tokens=32,
        rank=rank,
        world_size=world_size,
        seed=3,
        start_step=start_step,
        consumed=consumed,
        random_crop=True,  # the crops must come back identical after a restart too
    )


def test_stream_crops_each_clip_with_the_originals_crop(shards):
    """Every row is its stored clip under one random resized crop drawn from (seed, dataset, position)."""
    stored = [s["frames"] for p in list_shards(shards) for s in read_shard(p)]
    batches = list(_take(make_loader(_stream([(shard_counts(shards), 1.0)], world_size=1), 0, 2), 3))
    for n, b in enumerate(batches):
        for row, got in enumerate(b["frames"].numpy()):
            rng = [3, 4, 0, 2 * n + row]
            crop = [random_resized_crop(f, np.random.default_rng(rng), 56) for f in stored]
            assert sum(np.array_equal(got, c) for c in crop) == 1
            assert not any(np.array_equal(got, f) for f in stored)


@pytest.mark.parametrize("stop", [3, 4])
def test_stream_restarts_exactly_from_its_position(shards, stop):
    """A stream started at step ``stop`` from the global position after it continues the full stream."""
    counts = shard_counts(shards)
    assert [n for _, n in counts] == [2, 2, 2, 2]
    datasets = [(counts, 1.0), (counts[:2] + counts[:2], 3.0)]  # two "datasets", mixed 1:3
    full = list(_take(make_loader(_stream(datasets, rank=1, grad_accum=2), 2, 2), 24))
    consumed = [0, 0]
    for step in range(stop):
        consumed = advance(consumed, [1.0, 3.0], 3, step, 2 * 2 * 2)
    rest = _stream(datasets, start_step=stop, consumed=consumed, rank=1, grad_accum=2)
    rest = list(_take(make_loader(rest, 2, 2), 24 - 2 * stop))
    for a, b in zip(full[2 * stop :], rest, strict=True):
        assert (a["step"], a["micro"], a["dataset"], a["keys"]) == (
            b["step"],
            b["micro"],
            b["dataset"],
            b["keys"],
        )
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert {b["dataset"] for b in full} == {0, 1}


def _take(loader, n):
    it = iter(loader)
    for _ in range(n):
        yield next(it)


def test_mismatched_shards_are_refused(shards, tmp_path):
    cfg = tiny()
    assert inspect_shards(shards, "auto", 8, cfg).kind == "frames"
    with pytest.raises(ConfigError, match=r"model.image_size is 28 but .* 56x56"):
        inspect_shards(shards, "auto", 8, load_config(type(cfg), values={**vars(cfg), "image_size": 28}))
    with pytest.raises(ConfigError, match="data.num_frames is 4 but .* 8 frames"):
        inspect_shards(shards, "auto", 4, cfg)
    with pytest.raises(ConfigError, match="data.input=features but .* hold frames"):
        inspect_shards(shards, "features", 8, cfg)
    other = write_feature_shards(shards, tmp_path / "feats", fingerprint="0123456789abcdef")
    with pytest.raises(ConfigError, match="another frozen encoder"):
        inspect_shards(other, "auto", 8, cfg)
    same = encoder_weights_fingerprint(VideoLLaMA(tiny()))
    check_encoder_weights([str(other)], same)  # same weights: accepted
    with pytest.raises(ConfigError, match="encoder with other weights"):
        check_encoder_weights([str(other)], "feedfacefeedface")
    # through the command line: a clear one-line error, no traceback
    p = run_train(1, f"data.shards={shards}", f"run_dir={tmp_path / 'r'}", "data.num_frames=4", check=False)
    assert p.returncode != 0 and "data.num_frames is 4" in p.stderr and "Traceback" not in p.stderr


# ---- training runs -----------------------------------------------------------------------------


# One 40-step run with checkpoints and MLflow, trained once for the checks that only read it (they copy
# it before changing anything).
TRAINED_STEPS = 40
TRAINED_ARGS = ("save_every=10", "optim.init_lr=5e-3")


@pytest.fixture(scope="module")
def trained_run(shards, tmp_path_factory) -> tuple[Path, str]:
    """(run folder, the launcher's stdout) of ``TRAINED_STEPS`` single-process steps on ``shards``."""
    run_dir = tmp_path_factory.mktemp("trained_run") / "run"
    p = run_train(
        1, f"data.shards={shards}", f"run_dir={run_dir}", *TRAINED_ARGS, f"max_steps={TRAINED_STEPS}"
    )
    return run_dir, p.stdout


def test_single_process_memorises_checkpoints_and_logs_to_mlflow(trained_run):
    from mlflow.tracking import MlflowClient

    run_dir, stdout = trained_run
    assert stdout.startswith("[train] starting 1 process(es): importing torch + DeepSpeed")
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 41))
    first, last = np.mean([loss[s] for s in range(1, 5)]), np.mean([loss[s] for s in range(36, 41)])
    # 8 captions through 32 soft tokens into a random frozen 2-layer LLM: from ln(1000) = 6.9 down
    assert first > 6.8 and last < first - 0.15, (first, last)

    # the checkpoint holds trainable weights + Adam state, no frozen weights
    ckpt = checkpoint.latest(run_dir)
    assert ckpt.name == "step_00000040" and len(checkpoint.complete_checkpoints(run_dir)) == 2
    torch.manual_seed(0)
    model = VideoLLaMA(tiny())
    n_trainable = sum(p.numel() for _, p in model.trainable_parameters())
    n_frozen = sum(p.numel() for p in model.parameters()) - n_trainable
    size = checkpoint.checkpoint_bytes(ckpt)
    # fp32 master weights + Adam m, v = 12 bytes per trainable param (+ headers), whole, not per rank;
    # the frozen weights (4 bytes each) would not fit under the bound
    assert 3 * 4 * n_trainable < size < 5 * 4 * n_trainable < size + 4 * n_frozen, (
        size,
        n_trainable,
        n_frozen,
    )
    module = torch.load(ckpt / "trainable_state.pt", weights_only=True)["params"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(module) and {n for n, _ in model.trainable_parameters()} <= set(module)
    sd, mcfg = load_trainable(run_dir / "export")
    shipped = dataclasses.replace(tiny(), frame_position_init="sinusoidal")  # stage1_tiny.yaml's model keys
    assert mcfg == shipped and torch.equal(sd["llama_proj.weight"], module["llama_proj.weight"].float())

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.data.params["max_steps"] == "40" and run.data.tags["git_commit"]
    for name in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_s", "compute_s"):
        assert len(client.get_metric_history(run_id, name)) == 40, name
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [loss[s] for s in range(1, 41)]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "export"}


def test_more_steps_continue_the_run_and_its_mlflow_run(shards, trained_run, tmp_path):
    """The same command with more steps continues the run and the MLflow run (on a copy of the shared
    run folder, which resumes into itself)."""
    import shutil

    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    run_id = (run_dir / "mlflow_run_id").read_text()
    run_train(1, f"data.shards={shards}", f"run_dir={run_dir}", *TRAINED_ARGS, "max_steps=45")
    assert sorted(losses(run_dir)) == list(range(1, 46))
    assert (run_dir / "mlflow_run_id").read_text() == run_id
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert len(client.get_metric_history(run_id, "loss")) == 45
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_two_ranks_killed_and_restarted_give_the_same_losses(shards, tmp_path):
    args = [f"data.shards={shards}", "max_steps=150", "save_every=10", "data.workers=2", "tracking=false"]
    ref = tmp_path / "ref"
    run_train(2, *args, f"run_dir={ref}")
    expected = losses(ref)
    assert sorted(expected) == list(range(1, 151))

    run_dir = tmp_path / "killed"
    cmd = train_cmd(2, *args, f"run_dir={run_dir}")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while checkpoint.latest(run_dir) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)  # the launcher and both ranks (torchrun starts each in a session of its own)
    proc.wait()
    killed_at = max(losses(run_dir))
    assert killed_at < 150, "the run finished before it could be killed"

    run_train(2, *args, f"run_dir={run_dir}")
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 151))
    diff = max(abs(got[s] - expected[s]) for s in expected)
    assert diff <= 1e-6, (killed_at, diff)


@pytest.mark.slow
def test_cached_features_from_arrow_shards_train_like_frames(shards, short_frames_run, tmp_path):
    feats = write_feature_shards(shards, tmp_path / "feats")
    common = SHORT_RUN  # as short_frames_run, which trained on the frames of these shards
    run_train(1, f"data.shards={feats}", f"run_dir={tmp_path / 'f'}", *common)
    f, v = losses(tmp_path / "f"), losses(short_frames_run)
    assert all(abs(f[s] - v[s]) < 5e-3 for s in (1, 2, 3)), (f, v)  # fp16 cache vs fp32 encoder output
    mixed = f"data.datasets=[{{shards: {feats}, weight: 1}}, {{shards: {feats}, weight: 3}}]"
    run_train(1, mixed, "data.shards=null", f"run_dir={tmp_path / 'm'}", *common)
    assert sorted(losses(tmp_path / "m")) == [1, 2, 3]


@pytest.mark.slow
def test_mlflow_server_receives_the_run(shards, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        run_train(
            1,
            f"data.shards={shards}",
            f"run_dir={run_dir}",
            "max_steps=4",
            "save_every=2",
            env=train_env(MLFLOW_TRACKING_URI=uri),
        )
        assert not (run_dir / "mlflow.db").exists()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        run_id = (run_dir / "mlflow_run_id").read_text()
        history = client.get_metric_history(run_id, "loss")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert [m.value for m in history] == pytest.approx([losses(run_dir)[s] for s in (1, 2, 3, 4)])
        assert "export" in {a.path for a in client.list_artifacts(run_id)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
def test_crash_resume_copy_and_rerun_with_other_settings(shards, tmp_path):
    """Killed while saving step 6: the rerun logs each step to MLflow once; a rerun with other settings is
    refused naming them; a copied run folder resumes into itself, never into the original."""
    import shutil

    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = [f"data.shards={shards}", "max_steps=6", "save_every=3", "data.workers=1"]
    proc = subprocess.Popen(
        train_cmd(1, *args, f"run_dir={run_dir}"),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    saving = run_dir / "checkpoints" / "step_00000006"
    deadline = time.monotonic() + 280
    while not saving.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(run_dir).name == "step_00000003", "not killed while step 6 was saving"
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]

    # other settings for the same run: refused before any work, the differences named
    config = (run_dir / "config.yaml").read_text()
    p = run_train(1, *args, f"run_dir={run_dir}", "optim.init_lr=0.5", "micro_batch=1", "seed=7", check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and err.startswith("Error: run_dir") and "Traceback" not in p.stderr
    assert "optim.init_lr: 0.003 -> 0.5" in err and "micro_batch: 2 -> 1" in err and "seed: 42 -> 7" in err
    assert "only run_dir, max_steps" in err and (run_dir / "config.yaml").read_text() == config

    # a copy resumes (with an allowed change) into its own folder; the original is untouched
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = _tree(run_dir)
    p = run_train(1, *args, f"run_dir={copy}", "max_steps=7")
    assert "resumed from" in p.stdout and "step_00000003" in p.stdout
    assert _tree(run_dir) == before
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    assert client.get_run(run_id).info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
    assert {a.path for a in client.list_artifacts(run_id, "export")} >= {"export/trainable.safetensors"}
    assert (copy / "mlartifacts").is_dir() and sorted(losses(copy)) == list(range(1, 8))
    for key in ("loss", "lr", "grad_norm", "samples_seen", "data_errors"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, 8)), (key, steps)  # one point per step
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert loss == losses(copy)


@pytest.mark.slow
def test_corrupt_shard_warns_and_stops_above_the_error_rate(shards, tmp_path):
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    bad = data / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    args = [f"data.shards={data}", "data.workers=1", "tracking=false", "save_every=100"]
    p = run_train(1, *args, f"run_dir={tmp_path / 'a'}", "max_steps=4", check=False)  # 4 steps: every shard
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert re.search(r"Error: data: [12] of \d+ samples read so far were unusable", p.stderr), p.stderr
    assert "data.max_error_rate=0.01" in p.stderr
    assert f"warning: rank 0: skipping unusable samples of {bad}" in p.stdout
    p = run_train(1, *args, f"run_dir={tmp_path / 'b'}", "max_steps=4", "data.max_error_rate=0.3")
    assert p.stdout.count(f"skipping unusable samples of {bad} (ReadError: ") == 1, p.stdout
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    # 4 steps of 2 = one epoch: both samples of the cut shard visited once (a spare drawn for one of them
    # may hit the cut shard again: counted too)
    assert rows[-1]["step"] == 4 and rows[-1]["data_errors"] >= 2


@pytest.mark.slow  # three more training processes on copies of the shared run
def test_damaged_newest_checkpoint_falls_back_to_the_previous(shards, trained_run, tmp_path):
    """Truncated trainable state / train-state JSON, a missing trainable state, a flipped byte inside a tensor
    (which torch.load reads silently): the previous intact checkpoint is used with a warning (same losses as the run that never broke); none intact: one line naming it."""
    import shutil

    args = [f"data.shards={shards}", *TRAINED_ARGS, f"max_steps={TRAINED_STEPS}"]
    ref = trained_run[0]  # checkpoints at steps 30 and 40 (keep_last 2); copied before any change
    step2, step4 = (ref / "checkpoints" / f"step_000000{s}" for s in (30, 40))
    assert checkpoint.problems(step4) == []

    def damaged(name: str, change) -> Path:
        run_dir = tmp_path / name
        shutil.copytree(ref, run_dir)
        (run_dir / "COMPLETE").unlink()  # killed after saving step 4, before finishing: a rerun resumes
        change(run_dir / "checkpoints" / step4.name)
        return run_dir

    def cut(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def flip(path: Path) -> None:
        """One byte inside a tensor's stored bytes: the zip stays intact and torch.load reads it."""
        import zipfile

        with zipfile.ZipFile(path) as z:
            rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        data = bytearray(path.read_bytes())
        data[rec.header_offset + 30 + len(rec.filename.encode()) + len(rec.extra) + rec.file_size // 2] ^= (
            0xFF
        )
        path.write_bytes(bytes(data))
        assert checkpoint._torch_file_problem(path) is None and torch.load(path, weights_only=False)

    optim = damaged("optim", lambda c: cut(c / "trainable_state.pt"))
    state = damaged("state", lambda c: cut(c / "train_state.json"))
    model = damaged("model", lambda c: (c / "trainable_state.pt").unlink())
    bits = damaged("bits", lambda c: flip(c / "trainable_state.pt"))
    for run_dir, says in [
        (optim, "trainable_state.pt is not a complete torch file"),
        (state, "train_state.json is missing or not valid JSON"),
        (model, "trainable_state.pt (trainable weights and optimizer state) is missing"),
        (bits, "trainable_state.pt does not hold the bytes it was saved with"),
    ]:
        found = checkpoint.problems(run_dir / "checkpoints" / step4.name)
        assert len(found) == 1 and says in found[0], found
    assert checkpoint.resume_point(state, rank=0).name == step2.name
    assert (state / "checkpoints" / f"broken_{step4.name}").is_dir()
    assert checkpoint.resume_point(bits, rank=0).name == step2.name

    (optim / "metrics.jsonl").write_text("")  # the rerun rewrites steps 31-40 from the step-30 checkpoint
    p = run_train(1, *args, f"run_dir={optim}")
    assert f"warning: checkpoint {step4.name} is damaged" in p.stdout
    assert f"resumed from {optim / 'checkpoints' / step2.name}" in p.stdout
    assert losses(optim) == {s: v for s, v in losses(ref).items() if s > 30}

    cut(model / "checkpoints" / step2.name / "trainable_state.pt")
    p = run_train(1, *args, f"run_dir={model}", check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert (
        err.startswith("Error: no intact checkpoint to resume from:")
        and "trainable_state.pt (trainable" in err
    )


def test_unwritable_run_dir_is_one_line_before_work(shards, tmp_path):
    from train.loop import run

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = load_config(TrainConfig, TINY, [f"data.shards={shards}", f"run_dir={blocker / 'run'}"])
    with pytest.raises(ConfigError, match=r"run_dir: cannot write in .*a_file/run"):
        run(cfg)


def test_training_adopts_the_encoder_its_feature_cache_was_made_with(tmp_path):
    """A cache made with features.blip2_path=X trains a model whose encoder is X (so captioning raw
    videos later runs the same encoder); a model naming its own weights, or caches that disagree, are
    left as they are."""
    import dataclasses

    from pipeline.model import tiny
    from pipeline.shards import CONFIG_FILE
    from train.data import adopt_cached_encoder

    def cache(name: str, blip2: str | None) -> str:
        folder = tmp_path / name
        folder.mkdir()
        features = {"enabled": True, "blip2_path": blip2, "eva_vit_path": None, "qformer_lavis_path": None}
        (folder / CONFIG_FILE).write_text(json.dumps({"config": {"features": features}}))
        return str(folder)

    a, b, other, random = cache("a", "/enc"), cache("b", "/enc"), cache("c", "/other"), cache("r", None)
    assert adopt_cached_encoder(tiny(), [a, b]).blip2_path == "/enc"
    own = dataclasses.replace(tiny(), blip2_path="/mine")
    assert adopt_cached_encoder(own, [a]) is own
    assert adopt_cached_encoder(tiny(), [a, other]).blip2_path is None
    assert adopt_cached_encoder(tiny(), [random]).blip2_path is None
    assert adopt_cached_encoder(tiny(), [str(tmp_path / "no_config")]).blip2_path is None


def test_shard_config_reader_is_typed(tmp_path):
    """A shard folder's _config.json through one reader: typed fields, None without the file, a clear
    error for a broken one."""
    from pipeline.config import ConfigError
    from pipeline.shards import CONFIG_FILE, read_shard_config

    assert read_shard_config(tmp_path) is None
    cfg = {"num_frames": 4, "size": 32, "features": {"enabled": True, "blip2_path": "/enc"}}
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"fingerprint": "abc", "config": cfg}))
    written = read_shard_config(tmp_path)
    assert (written.fingerprint, written.num_frames, written.size) == ("abc", 4, 32)
    assert written.features == {"enabled": True, "blip2_path": "/enc"} and written.config == cfg
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"config": {"features": None}}))
    assert read_shard_config(tmp_path).features == {} and read_shard_config(tmp_path).num_frames is None
    (tmp_path / CONFIG_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_shard_config(tmp_path)
