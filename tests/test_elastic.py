"""Elastic resume: a run continues on another number of processes (GPUs, nodes) or loader workers with the
same global batches, the same losses (to reduction order) and every sample once per epoch.

Real processes: torchrun over gloo, DeepSpeed ZeRO-2 on CPU, SIGKILL of the whole process tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.model import tiny
from pipeline.prompts import prepare_tokenizer
from pipeline.shards import ShardFile, list_shards, read_shard
from pipeline.tiny import tiny_tokenizer
from tests.conftest import REPO, TINY, kill_tree, losses, run_train, train_cmd, train_env
from train import checkpoint
from train.config import TrainConfig, check_rerun, elastic_batch
from train.data import GlobalOrder, TrainStream, advance, make_loader, shard_counts


def keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    rows = [json.loads(line) for line in (run_dir / "keys.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # once each: a resume truncates
    return {r["step"]: r["keys"] for r in rows}


def metric(run_dir: Path, name: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r[name] for r in rows}


# ---- the order alone (no training) ---------------------------------------------------------------


def _global_batches(datasets, world: int, accum: int, workers: int, steps: int, start=0, consumed=None):
    """{step: keys of the whole global batch in micro-batch order}, from every rank's loader."""
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    got: dict[int, dict[int, list[str]]] = {}
    for rank in range(world):
        stream = TrainStream(
            datasets,
            kind="frames",
            tokenizer=tok,
            mcfg=tiny(),
            micro_batch=4 // (world * accum) if world * accum < 4 else 1,
            grad_accum=accum,
            max_caption_tokens=32,
            rank=rank,
            world_size=world,
            seed=11,
            start_step=start,
            consumed=consumed,
        )
        it = iter(make_loader(stream, workers, 2))
        for _ in range((steps - start) * accum):
            b = next(it)
            got.setdefault(b["step"], {})[b["micro"]] = b["keys"]
    return {s: [k for _, ks in sorted(m.items()) for k in ks] for s, m in got.items()}


def test_global_batches_do_not_depend_on_ranks_workers_or_restarts(frame_shards):
    """Global batch 4 as 1 rank x 4 accumulated, 2 x 2 and 4 x 1, with 0-3 loader workers, restarted at
    step 3: the same keys at every step; each epoch (2 steps of 4 of the 8 clips) holds every clip once."""
    counts = shard_counts(frame_shards)
    datasets = [(counts, 1.0)]
    ref = _global_batches(datasets, world=2, accum=2, workers=2, steps=8)
    assert sorted(ref) == list(range(8)) and all(len(k) == 4 for k in ref.values())
    for epoch in range(4):
        seen = ref[2 * epoch] + ref[2 * epoch + 1]
        assert len(set(seen)) == 8, seen
    assert ref[0] + ref[1] != ref[2] + ref[3]  # epochs are reshuffled
    for world, accum, workers in [(1, 4, 0), (1, 4, 3), (4, 1, 1), (2, 1, 0)]:
        assert _global_batches(datasets, world, accum, workers, 8) == ref, (world, accum, workers)
    consumed = [0]
    for step in range(3):
        consumed = advance(consumed, [1.0], 11, step, 4)
    assert consumed == [12]  # a few integers: 1.5 epochs of dataset 0
    assert _global_batches(datasets, 4, 1, 2, 8, start=3, consumed=consumed) == {
        s: k for s, k in ref.items() if s >= 3
    }


def test_epochs_shuffle_samples_within_blocks_of_shards():
    shards = [(name, 3) for name in "abcdef"]
    for block in (1, 2, 8):
        order = GlobalOrder(shards, seed=1, block=block)
        for epoch in range(3):
            got = [order.locate(18 * epoch + p) for p in range(18)]
            assert sorted(got) == [(i, k) for i in range(6) for k in range(3)]  # each sample once
            runs = [{i for i, _ in got[b : b + 3 * block]} for b in range(0, 18, 3 * block)]
            assert [len(r) for r in runs] == [min(block, 6 - block * n) for n in range(len(runs))], got
        if block == 1:  # one shard at a time, in file order
            assert [k for _, k in got] == [0, 1, 2] * 6


def test_random_access_reads_what_the_stream_reads(frame_shards, tmp_path):
    import tarfile

    for path in list_shards(frame_shards):
        stored, f = list(read_shard(path)), ShardFile(path)
        assert len(f) == len(stored)
        for i in reversed(range(len(stored))):
            got = f.sample(i)
            assert got["key"] == stored[i]["key"] and got["meta"] == stored[i]["meta"]
            assert np.array_equal(got["frames"], stored[i]["frames"])
    cut = tmp_path / "cut.tar"
    data = Path(path).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    f = ShardFile(cut)
    assert len(f) < len(stored)
    with pytest.raises(tarfile.ReadError):  # "empty header" or "unexpected end of data", by where it is cut
        f.sample(len(stored) - 1)


def test_global_batch_is_kept_or_refused_in_one_line():
    assert elastic_batch(4, 1, 2) == (1, 2)
    assert elastic_batch(4, 1, 1) == (1, 4) and elastic_batch(4, 1, 4) == (1, 1)
    assert elastic_batch(64, 8, 16) == (4, 1)  # the micro-batch shrinks when it must
    assert elastic_batch(64, 8, 2) == (8, 4)
    with pytest.raises(ConfigError) as e:
        elastic_batch(4, 1, 3)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("world sizes that keep it: 1, 2, 4"), msg


def test_a_rerun_may_change_loader_workers_but_not_the_batch(frame_shards, tmp_path):
    from pipeline.config import save_yaml

    args = [f"data.shards={frame_shards}", f"run_dir={tmp_path}", "data.workers=2"]
    save_yaml(load_config(TrainConfig, TINY, args), tmp_path / "config.yaml")
    check_rerun(load_config(TrainConfig, TINY, [*args, "data.workers=0", "data.log_keys=true"]), tmp_path)
    with pytest.raises(ConfigError, match=r"micro_batch: 16 -> 8.*data.workers.*number of GPUs and nodes"):
        check_rerun(load_config(TrainConfig, TINY, [*args, "micro_batch=8"]), tmp_path)


def test_checkpoint_from_before_elastic_resume_is_refused_in_one_line(tmp_path):
    old = tmp_path / "checkpoints" / "step_00000010"
    old.mkdir(parents=True)
    (old / "train_state_rank0.json").write_text(json.dumps({"step": 10, "world_size": 2, "cursors": []}))
    (old / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (old / "COMPLETE").write_text(json.dumps({"step": 10, "files": {}}))
    assert checkpoint.resume_point(tmp_path, rank=0) == old  # not set aside as damaged: it is kept
    with pytest.raises(ConfigError) as e:
        checkpoint.read_state(old)
    msg = str(e.value)
    assert "\n" not in msg and "written before elastic resume" in msg and "init_from=" in msg


# ---- real runs -----------------------------------------------------------------------------------

STEPS = 24
# global batch 4 = micro 1 x accum 2 x 2 ranks (micro 1: every micro-batch is one clip, so a resume on
# 1 or 4 ranks trains the same micro-batches, only reduced in another order)
ARGS = ("micro_batch=1", "grad_accum=2", f"max_steps={STEPS}", "save_every=10", "data.log_keys=true")


def _start(nproc: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        train_cmd(nproc, *args),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_ranks_killed_resume_on_one_and_four_ranks_with_the_same_batches(frame_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    args = [f"data.shards={frame_shards}", *ARGS]
    ref = tmp_path / "ref"
    run_train(2, *args, "data.workers=2", f"run_dir={ref}")
    expected, expected_keys = losses(ref), keys_by_step(ref)
    assert sorted(expected) == sorted(expected_keys) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    proc = _start(2, *args, "data.workers=2", f"run_dir={killed}")
    deadline = time.monotonic() + 240

    def logged() -> int:
        try:
            return max(losses(killed), default=0)
        except (OSError, ValueError):  # not written yet, or a line being written
            return 0

    try:  # killed 2 steps past the step-10 checkpoint: those steps are trained again after the resume
        while logged() < 12 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)
    saved_at = checkpoint.read_state(checkpoint.latest(killed)).step
    killed_at = max(losses(killed))
    assert saved_at < killed_at < STEPS, ("the run was not killed between checkpoints", saved_at, killed_at)

    runs = {}
    for nproc, workers in [(1, 3), (4, 1)]:
        run_dir = tmp_path / f"on{nproc}"
        shutil.copytree(killed, run_dir)
        p = run_train(nproc, *args, f"data.workers={workers}", f"run_dir={run_dir}")
        assert (
            f"world size 2 -> {nproc}: global batch 4 = micro_batch 1 x grad_accum {4 // nproc}" in p.stdout
        )
        runs[nproc] = run_dir
        got, keys = losses(run_dir), keys_by_step(run_dir)
        assert sorted(got) == sorted(keys) == list(range(1, STEPS + 1))
        assert keys == expected_keys  # the same global batch (the same sample keys) at every step
        assert metric(run_dir, "lr") == metric(ref, "lr")  # the schedule by global step
        rel = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
        print(
            f"killed at step {killed_at}, resumed at {saved_at} on {nproc} rank(s), {workers} worker(s): "
            f"max rel loss diff {rel:.3g}"
        )
        assert rel <= 1e-5, (nproc, rel)
        for epoch in range(STEPS // 2):  # 8 clips, 4 per step: every clip once per epoch, across the change
            seen = keys[2 * epoch + 1] + keys[2 * epoch + 2]
            assert len(set(seen)) == 8, (epoch, seen)
        client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
        run_id = (run_dir / "mlflow_run_id").read_text()
        assert [r.info.run_id for r in client.search_runs(client.search_experiments()[0].experiment_id)] == [
            run_id
        ]
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # one point per step
        state = checkpoint.read_state(checkpoint.latest(run_dir))
        assert (state.step, state.world_size, state.global_batch) == (STEPS, nproc, 4)
        assert state.consumed == [4 * STEPS]
    # the trained weights agree too, as a whole (a few tensors, e.g. attention key biases, get no true
    # gradient: Adam turns their round-off into steps of lr size, which differ with the reduction order)
    ref_w = torch.load(checkpoint.latest(ref) / "trainable_state.pt", weights_only=True)["params"]
    flat = torch.cat([w.flatten() for w in ref_w.values()])
    for n, run_dir in runs.items():
        got_w = torch.load(checkpoint.latest(run_dir) / "trainable_state.pt", weights_only=True)["params"]
        rel = float(torch.cat([got_w[k].flatten() for k in ref_w]).sub(flat).norm() / flat.norm())
        print(f"on {n} rank(s): final weights, relative difference {rel:.3g}")
        assert rel <= 1e-4, (n, rel)
