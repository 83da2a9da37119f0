"""Training, both stages: the video Q-Former, frame position embedding and projection on a frozen
encoder + LLM. Stage 1 trains on captions (``data.task=caption``); stage 2 on instructions
(``data.task=conversation``), starting from a stage-1 export (``init_from=runs/stage1/export``) or a
released Video-LLaMA ``.pth``.

CPU (tests, demo)::

    python cli.py train --config configs/stage1_tiny.yaml data.shards=SHARDS run_dir=runs/tiny
    torchrun --nproc_per_node=2 cli.py train --config configs/stage1_tiny.yaml data.shards=SHARDS
    python cli.py train --config configs/stage2_tiny.yaml init_from=demo_out/run/export

One node, 8 GPUs::

    torchrun --nproc_per_node=8 cli.py train --config configs/stage1_vit-g_7b.yaml
    deepspeed --num_gpus 8 cli.py train --config configs/stage1_vit-g_7b.yaml
    torchrun --nproc_per_node=8 cli.py train --config configs/stage2_vit-g_7b.yaml

Several nodes: ``srun`` one task per GPU with MASTER_ADDR/MASTER_PORT exported (pipeline.distributed).

Restarting the same command resumes from the newest complete checkpoint in ``run_dir`` with the same
losses as a run that never stopped (model, optimizer, the global data position: the TrainState of
train.checkpoint), also on another number of processes or nodes, or of loader workers: the global batch
``micro_batch x grad_accum x world`` of the first start is kept (train.config.elastic_batch), every later
step trains the same samples (train.data's global order), and dropout is seeded per micro-batch of the
global batch, not per rank. The optimizer, the original's schedule (set by the global step) and the
engine are in train.engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import ConfigError, check_writable, save_yaml, to_dict
from pipeline.distributed import DistInfo
from pipeline.folderlock import folder_lock, requeue_wait_s
from pipeline.model import ModelConfig, VideoLLaMA, clip_from_frames, encoder_weights_fingerprint
from pipeline.rundir import CHECKPOINTS, COMPLETE, CONFIG, EXPORT, INIT_FROM, KEYS, METRICS, MODEL_CONFIG
from pipeline.shards import inspect_shards, unfinished_output, write_json
from pipeline.tracking import check_server, git_commit, make_tracker, resolve_uri
from train import checkpoint
from train.checkpoint import TrainState
from train.config import TrainConfig, check_rerun, elastic_batch
from train.data import (
    TrainStream,
    adopt_cached_encoder,
    advance,
    check_encoder_weights,
    check_error_budget,
    make_loader,
    shard_counts,
)
from train.engine import (
    REPO,
    build_engine,
    build_model,
    check_label_mask,
    check_template,
    set_master_weights,
    step_lr,
    training_tokenizer,
)
from train.preemption import REQUEUE_EXIT_CODE, StopRequest
from train.validation import evaluate_in_training

Datasets = list[tuple[list[tuple[str, int]], float]]  # per dataset: ([(shard, samples)], weight)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Set up (data, process group, model, engine, resume), train to ``max_steps``, finish.

    Rank 0 holds the run folder's lock throughout (pipeline.folderlock): a second job on the same
    ``run_dir`` is refused in one line naming the holder."""
    check_writable(cfg.run_dir, "run_dir")  # one line now, not a traceback at the first checkpoint
    rank = distributed.launcher_env()[0]
    if rank != 0:
        return _train(cfg)
    with folder_lock(cfg.run_dir, "run_dir", "train", requeue_wait_s()):
        if cfg.tracking:  # seconds, not minutes of retries followed by a traceback
            check_server(resolve_uri(cfg.run_dir, cfg.tracking_uri))
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    check_rerun(cfg, cfg.run_dir)  # before anything else: a rerun with other settings is refused
    mcfg = adopt_cached_encoder(cfg.model, [s.shards for s in cfg.data.specs()])
    datasets, kind = check_data(cfg, mcfg)  # before the process group: a config error is one line per rank
    info = distributed.init()
    rank, world, main = info.rank, info.world_size, info.is_main
    run_dir = Path(cfg.run_dir)
    ckpt = checkpoint.resume_point(run_dir, rank)  # collective; sets damaged checkpoints aside
    saved = checkpoint.read_state(ckpt) if ckpt is not None else None  # refuses the pre-elastic format
    global_batch = saved.global_batch if saved else cfg.micro_batch * cfg.grad_accum * world
    micro, accum = elastic_batch(global_batch, cfg.micro_batch, world)  # one line if it cannot be kept
    run_cfg = dataclasses.replace(cfg, micro_batch=micro, grad_accum=accum)  # this world's split
    steps_per_epoch, max_steps = schedule_length(cfg, datasets, global_batch)
    if (done := finished_run(run_dir, max_steps)) is not None:
        return already_complete(cfg, run_dir, done, max_steps, kind, info)
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if info.device.type == "cuda" else "fp32")
    )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / CONFIG)
        save_yaml(mcfg, run_dir / MODEL_CONFIG)
    distributed.barrier()

    model = build_model(cfg, mcfg, verbose=main)
    if kind == "features":  # before DeepSpeed casts the module: the cache hashed the encoder as built
        use_cached_features(cfg, model, main)
    start = {n: p.detach().clone() for n, p in model.trainable_parameters()} if cfg.init_from else None
    tokenizer = training_tokenizer(cfg, mcfg)
    check_template(cfg, mcfg, main)
    check_label_mask(cfg, tokenizer, main)
    engine, optimizer = build_engine(run_cfg, model, precision, info, run_dir)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    init_checksum = set_master_weights(model, start) if start is not None else None
    del start

    state, resumed_from = resume(cfg, engine, ckpt, info, len(datasets), global_batch, saved)
    if main:
        _truncate_metrics(run_dir / METRICS, state.step)
        _truncate_metrics(run_dir / KEYS, state.step)
        if resumed_from is not None and saved.world_size != world:
            print(
                f"[train] world size {saved.world_size} -> {world}: global batch {global_batch} = micro_batch "
                f"{micro} x grad_accum {accum} x {world}",
                flush=True,
            )
    stream = make_stream(run_cfg, mcfg, datasets, kind, tokenizer, info, state)
    weights = [w for _, w in datasets]
    stop = StopRequest()  # before the loader forks its workers, so they inherit the handler
    batches = iter(make_loader(stream, cfg.data.workers, cfg.data.prefetch))
    tracker = make_tracker(main, cfg.tracking, run_dir, cfg.experiment, cfg.tracking_uri, cfg.run_name)
    tracker.skip_logged_steps()  # a crash after the checkpoint logged steps that are now recomputed
    if resumed_from is None:
        start_tracking(tracker, cfg, run_dir, info, kind, max_steps, init_checksum)
    else:
        tracker.set_tags(
            {f"resumed_at_step_{state.step}": resumed_from.name, f"world_size_from_step_{state.step}": world}
        )
    if main:  # steps an earlier attempt could not log (tracking server down) are logged now
        tracker.backfill(unlogged_rows(run_dir, tracker.logged_step(), cfg.log_every, max_steps))

    def export(out: Path) -> None:
        from pipeline.weights import export_trainable

        export_trainable({k: v.float() for k, v in model.trainable_state_dict().items()}, mcfg, out)

    engine.train()
    last_saved, loss = None, float("nan")
    warned: set[str] = set()  # shards already named in a warning
    dataset_size = sum(n for shards, _ in datasets for _, n in shards)
    while state.step < max_steps:
        t_step = time.perf_counter()
        lr = step_lr(state.step, cfg.optim, max_steps, cfg.grad_accum)  # by global step, on any world
        local, keys = train_step(
            engine, optimizer, batches, run_cfg, kind, dtype, info.device, state, lr, rank, warned
        )
        if cfg.data.log_keys:
            log_keys(run_dir, state.step + 1, distributed.all_gather_object(keys), main)
        state.consumed = advance(state.consumed, weights, stream.seed, state.step, global_batch)
        state.step += 1
        grad_norm = engine.get_global_grad_norm()
        total = distributed.all_reduce_named({**local, "stop": float(stop.requested)}, info.device)
        stop_now = total["stop"] > 0 and state.step < max_steps
        loss = total["loss"] / world
        nonfinite = not (math.isfinite(loss) and _finite(grad_norm) and engine.was_step_applied())
        state.samples_seen += int(total["samples"])
        state.skipped["errors"] += int(total["errors"])
        state.skipped["too_long"] += int(total["too_long"])
        read = state.samples_seen + state.skipped["errors"] + state.skipped["too_long"]
        try:  # the same numbers on every rank: all stop together
            check_error_budget(state.skipped["errors"], read, dataset_size, cfg.data.max_error_rate)
        except ConfigError:
            tracker.close("FAILED")
            raise
        if main:
            metrics = step_metrics(total, state, lr, grad_norm, time.perf_counter() - t_step, world)
            metrics["world_size"] = world
            metrics["epoch"] = state.step / steps_per_epoch
            log_step(cfg, run_dir, tracker, state.step, max_steps, metrics)
        if nonfinite:  # the same numbers on every rank: all skip, or all stop, together
            try:
                skip_nonfinite(cfg, state, loss, grad_norm, engine.was_step_applied(), main)
            except ConfigError:
                tracker.close("FAILED")
                raise
        if cfg.eval.shards and (state.step % cfg.eval.every == 0 or state.step == max_steps):
            evaluate_in_training(
                model, tokenizer, cfg.eval, state.step, rank, world, run_dir, tracker, info.device
            )
        if state.step % cfg.save_every == 0 or state.step == max_steps or stop_now:
            last_saved = checkpoint.save(engine, run_dir, state, rank, export, cfg.keep_last)
        if stop_now:
            if main:
                print(
                    f"[train] stop signal: saved step {state.step}, exit {REQUEUE_EXIT_CODE} to requeue",
                    flush=True,
                )
            tracker.close("KILLED")
            distributed.cleanup()
            raise SystemExit(REQUEUE_EXIT_CODE)

    if main and last_saved is not None:
        final = run_dir / EXPORT
        (run_dir / COMPLETE).unlink(missing_ok=True)  # the record below describes the new export only
        shutil.copytree(last_saved / EXPORT, final, dirs_exist_ok=True)
        files = {f"{EXPORT}/{k}": v for k, v in checkpoint.file_digests(final).items()}
        record = {"step": state.step, "checkpoint": last_saved.name, "loss": loss, "files": files}
        write_json({**record, "samples_seen": state.samples_seen}, run_dir / COMPLETE)
        tracker.log_artifact(final, "export")
    tracker.close()
    distributed.cleanup()
    return {
        "steps": state.step,
        "max_steps": max_steps,
        "loss": loss,
        "samples_seen": state.samples_seen,
        "input": kind,
        "run_dir": str(run_dir),
        "rank": rank,
    }


# ---- set-up --------------------------------------------------------------------------------------


def check_data(cfg: TrainConfig, mcfg: ModelConfig) -> tuple[Datasets, str]:
    """Shard counts of every dataset and the one input kind they share; refuses shards that do not fit,
    and the output of a preprocess job that did not finish (unless ``data.allow_unfinished``)."""
    specs = cfg.data.specs()
    for s in specs:
        if (why := unfinished_output(s.shards)) is None:
            continue
        if not cfg.data.allow_unfinished:
            raise ConfigError(
                f"data: {s.shards!r} is the output of a preprocess job that did not finish ({why}): rerun "
                "the same preprocess command to finish it (data.allow_unfinished=true trains on it as it is)"
            )
        if distributed.launcher_env()[0] == 0:
            print(
                f"[train] warning: data: {s.shards!r} is unfinished ({why}); training on it anyway",
                flush=True,
            )
    datasets = [(shard_counts(s.shards), s.weight) for s in specs]  # refuses missing folders
    keys = [f"data.datasets[{i}].num_frames" for i in range(len(specs))] if cfg.data.datasets else []
    kinds = {
        inspect_shards(s.shards, cfg.data.input, s.num_frames, mcfg, *keys[i : i + 1]).kind
        for i, s in enumerate(specs)
    }
    if len(kinds) > 1:
        raise ConfigError("data.datasets: mixes frame shards and feature shards; use one kind for all")
    return datasets, kinds.pop()


def finished_run(run_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """The record of a run that already trained ``max_steps`` (``RUN/COMPLETE``, written with its final
    export), else None. A finished run whose checkpoints were removed cannot train further: refused,
    rather than starting again from step 0 over its export."""
    try:
        done = json.loads((run_dir / COMPLETE).read_text())
        int(done["step"])
    except (OSError, ValueError, KeyError, TypeError):
        done = _finished_before_records(run_dir)
    if done is None:
        return None
    if done["step"] >= max_steps:
        return done
    if checkpoint.latest(run_dir) is None:
        raise ConfigError(
            f"run_dir {str(run_dir)!r} holds a run finished at step {done['step']} (export: "
            f"{run_dir / EXPORT}) without checkpoints to continue it to step {max_steps}: use another "
            f"run_dir (init_from={run_dir / EXPORT} starts from its weights)"
        )
    return None


def _finished_before_records(run_dir: Path) -> dict[str, Any] | None:
    """A run finished before ``RUN/COMPLETE`` was written: a final export, no checkpoint at all, and the
    last step of metrics.jsonl (its export's step)."""
    if (
        not (run_dir / EXPORT).is_dir()
        or (run_dir / CHECKPOINTS).is_dir()
        or not (run_dir / METRICS).is_file()
    ):
        return None
    lines = [ln for ln in (run_dir / METRICS).read_text().splitlines() if ln]
    return json.loads(lines[-1]) if lines else None


def already_complete(
    cfg: TrainConfig, run_dir: Path, done: dict, max_steps: int, kind: str, info: DistInfo
) -> dict[str, Any]:
    """A rerun of a finished run: say so, name its export, and log what the tracker missed."""
    if info.is_main:
        print(
            f"[train] {run_dir} is complete: trained {done['step']} of max_steps {max_steps} steps; export: "
            f"{run_dir / EXPORT} (nothing to do; a larger max_steps continues it)",
            flush=True,
        )
        tracker = make_tracker(True, cfg.tracking, run_dir, cfg.experiment, cfg.tracking_uri, cfg.run_name)
        tracker.skip_logged_steps()
        tracker.backfill(unlogged_rows(run_dir, tracker.logged_step(), cfg.log_every, done["step"]))
        tracker.close()
    distributed.cleanup()
    summary = {"steps": done["step"], "max_steps": max_steps, "loss": done.get("loss", float("nan"))}
    return {
        **summary,
        "samples_seen": done.get("samples_seen", 0),
        "input": kind,
        "run_dir": str(run_dir),
        "rank": info.rank,
        "already_complete": True,
    }


def unlogged_rows(run_dir: Path, logged: int, log_every: int, last: int) -> list[dict[str, Any]]:
    """metrics.jsonl rows past the tracker's newest step that the run logs (every ``log_every``, and
    ``last``): what an earlier attempt could not send while the tracking server was down."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    rows = (json.loads(ln) for ln in path.read_text().splitlines() if ln)
    return [r for r in rows if r["step"] > logged and (r["step"] % log_every == 0 or r["step"] == last)]


def schedule_length(cfg: TrainConfig, datasets: Datasets, global_batch: int) -> tuple[int, int]:
    """(steps per epoch, max steps): an epoch is every sample once at the global batch size."""
    total = sum(n for shards, _ in datasets for _, n in shards)
    steps_per_epoch = cfg.steps_per_epoch or max(1, total // global_batch)
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch


def use_cached_features(cfg: TrainConfig, model: VideoLLaMA, main: bool) -> None:
    """Refuse features cached with other encoder weights; free the frozen encoder, which never runs on
    features (unless validation needs it for frame shards)."""
    check_encoder_weights([s.shards for s in cfg.data.specs()], encoder_weights_fingerprint(model))
    eval_frames = cfg.eval.shards and inspect_shards(cfg.eval.shards, setting="eval.shards").kind == "frames"
    freed = 0 if eval_frames else model.drop_frozen_encoder()
    if main and freed:
        print(
            f"[train] cached features: frozen encoder not loaded on the device ({freed:,} params)", flush=True
        )


def resume(
    cfg: TrainConfig,
    engine,
    path: Path | None,
    info: DistInfo,
    num_datasets: int,
    global_batch: int,
    saved: TrainState | None,
) -> tuple[TrainState, Path | None]:
    """The state of checkpoint ``path`` (engine and RNG restored, on any world size), else a fresh one."""
    if path is None:
        torch.manual_seed(cfg.seed * 1000 + info.rank)  # anything else random differs across ranks
        fresh = TrainState(world_size=info.world_size, consumed=[0] * num_datasets, global_batch=global_batch)
        return fresh, None
    state = checkpoint.load(engine, path)
    if len(state.consumed) != num_datasets:
        raise ConfigError(
            f"data: the checkpoint {path.name} has positions for {len(state.consumed)} datasets, now {num_datasets}"
        )
    if info.is_main:
        print(
            f"[train] resumed from {path} at step {state.step} (saved on {saved.world_size} processes, "
            f"now {info.world_size})",
            flush=True,
        )
    state.world_size = info.world_size
    return state, path


def make_stream(cfg: TrainConfig, mcfg, datasets: Datasets, kind: str, tokenizer, info: DistInfo, state):
    """This rank's micro-batches of the global order, from the state's step and data position on."""
    return TrainStream(
        datasets,
        kind=kind,
        tokenizer=tokenizer,
        mcfg=mcfg,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.grad_accum,
        shuffle_block=cfg.data.shuffle_block,
        max_caption_tokens=cfg.data.max_caption_tokens,
        task=cfg.data.task,
        template=cfg.data.template,
        max_len=cfg.data.max_len,
        label_mask=cfg.data.label_mask,
        random_crop=cfg.data.random_crop,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.data.seed if cfg.data.seed is not None else cfg.seed,
        start_step=state.step,
        consumed=state.consumed,
    )


def log_keys(run_dir: Path, step: int, per_rank: list[list[tuple[int, list[str]]]], main: bool) -> None:
    """Rank 0: step ``step``'s sample keys, the whole global batch in micro-batch order, to keys.jsonl."""
    if main:
        keys = [k for _, ks in sorted(m for rank in per_rank for m in rank) for k in ks]
        with open(run_dir / KEYS, "a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def start_tracking(
    tracker, cfg: TrainConfig, run_dir: Path, info: DistInfo, kind: str, max_steps: int, checksum
):
    """A new run's params, tags and config artifact (a resumed run keeps its first attempt's)."""
    tracker.log_params({**to_dict(cfg), "resolved": {"max_steps": max_steps}})  # cfg.model is resolved
    tags = {
        "git_commit": git_commit(REPO),
        "world_size": info.world_size,
        "input": kind,
        "task": cfg.data.task,
    }
    if checksum is not None:  # the trainable weights at step 0, as the optimizer holds them
        tags.update(init_from=str(cfg.init_from), init_weights_checksum=checksum)
        if info.is_main:
            (run_dir / INIT_FROM).write_text(
                json.dumps({"init_from": str(cfg.init_from), "checksum": checksum}) + "\n"
            )
    tracker.set_tags(tags)
    tracker.log_artifact(run_dir / CONFIG)


# ---- the step ------------------------------------------------------------------------------------


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Dropout's seed for micro-batch ``micro`` of the global batch of step ``step``: the same whichever
    rank trains it."""
    return int(np.random.default_rng([seed, 6, step, micro]).integers(2**62))


def train_step(
    engine,
    optimizer,
    batches,
    cfg: TrainConfig,
    kind: str,
    dtype,
    device,
    state: TrainState,
    lr: float,
    rank: int = 0,
    warned: set[str] | None = None,
) -> tuple[dict[str, float], list[tuple[int, list[str]]]]:
    """``cfg.grad_accum`` micro-batches through the engine at learning rate ``lr``. Returns this rank's
    sums, to be all-reduced by name, and its micro-batches' sample keys ``[(micro, keys)]``; warns once per
    rank about each shard with unusable samples (``warned``: the shards already named)."""
    warned = set() if warned is None else warned
    accum = cfg.grad_accum
    sums = {"loss": 0.0, "tokens": 0.0, "samples": 0.0, "errors": 0.0, "wait_s": 0.0, "too_long": 0.0}
    keys = []
    for group in optimizer.param_groups:
        group["lr"] = lr
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        sums["wait_s"] += time.perf_counter() - t0
        if batch["step"] != state.step:
            raise RuntimeError(f"data: rank {rank} got a batch of step {batch['step']} at step {state.step}")
        keys.append((batch["micro"], batch["keys"]))
        sums["errors"] += batch["errors"]
        sums["too_long"] += batch["too_long"]
        for shard, why in batch["bad_shards"].items():
            if shard not in warned:  # once per shard and rank; the count goes to data_errors
                warned.add(shard)
                print(
                    f"[train] warning: rank {rank}: skipping unusable samples of {shard} ({why})", flush=True
                )
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "video_mask", "labels")}
        if kind == "frames":
            inputs["clip"] = clip_from_frames(batch["frames"].to(device), dtype)
        else:
            inputs["features"] = batch["features"].to(device, dtype)
        torch.manual_seed(micro_seed(cfg.seed, state.step, batch["micro"]))
        out = engine(**inputs)
        engine.backward(out.loss)
        engine.step()
        sums["loss"] += out.loss.item()
        sums["tokens"] += int(inputs["attention_mask"].sum())
        sums["samples"] += inputs["input_ids"].shape[0]
    sums["loss"] /= accum
    return sums, keys


def _finite(x) -> bool:
    return x is None or math.isfinite(float(x))


def skip_nonfinite(cfg: TrainConfig, state: TrainState, loss: float, grad_norm, applied: bool, main: bool):
    """A step with a non-finite loss or gradient norm. DeepSpeed's overflow check leaves the weights and
    the optimizer as they were; it is skipped, with a warning, while ``optim.skip_nonfinite`` allows.
    Otherwise the run stops here with one line, before any checkpoint of this step is written."""
    state.skipped["nonfinite"] = n = state.skipped.get("nonfinite", 0) + 1
    budget = cfg.optim.skip_nonfinite
    what = f"loss {loss:.4g}, grad norm {float('nan') if grad_norm is None else float(grad_norm):.4g}"
    if not applied and n <= budget:
        if main:
            print(
                f"[train] warning: step {state.step}: non-finite ({what}): update skipped "
                f"({n} of at most {budget}, optim.skip_nonfinite)",
                flush=True,
            )
        return
    newest = checkpoint.latest(cfg.run_dir)
    why = (
        "its update was applied, so it cannot be skipped"
        if applied
        else (f"{n - 1} skipped before, optim.skip_nonfinite={budget}" if budget else "")
    )
    raise ConfigError(
        f"step {state.step}: non-finite {what}{f' ({why})' if why else ''}; training stopped, this step "
        f"not saved (newest checkpoint: {newest.name if newest else 'none'}). Lower optim.init_lr or set "
        "optim.grad_clip; optim.skip_nonfinite=N skips up to N such steps"
    )


def step_metrics(total: dict[str, float], state: TrainState, lr: float, grad_norm, dt: float, world: int):
    wait_s = total["wait_s"] / world
    return {
        "loss": total["loss"] / world,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "samples_per_s": total["samples"] / dt,
        "tokens_per_s": total["tokens"] / dt,
        "step_time_s": dt,
        "data_wait_s": wait_s,
        "compute_s": dt - wait_s,
        "data_errors": state.skipped["errors"],  # unreadable / unusable samples skipped, all ranks
        "data_too_long": state.skipped["too_long"],  # conversations skipped: no fit in data.max_len
        "samples_seen": state.samples_seen,
    }


def log_step(cfg: TrainConfig, run_dir: Path, tracker, step: int, max_steps: int, metrics: dict) -> None:
    """Rank 0: every step to metrics.jsonl; every ``log_every`` steps (and the last) to MLflow and stdout."""
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if step % cfg.log_every == 0 or step == max_steps:
        tracker.log_metrics(metrics, step)
        print(
            f"[train] step {step}/{max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics['samples_per_s']:.1f} samples/s data {metrics['data_wait_s']:.2f}s",
            flush=True,
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past the resumed step, so the file reads like one uninterrupted run."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))
