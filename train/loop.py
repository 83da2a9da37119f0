"""Training, both stages: the video Q-Former, frame position embedding and projection on a frozen
encoder + LLM. Stage 1 trains on captions (``data.task=caption``); stage 2 on instructions
(``data.task=conversation``), starting from a stage-1 export (``init_from=runs/stage1/export``) or a
released Video-LLaMA ``.pth``.

CPU (tests, demo)::

    python cli.py train --config configs/stage1_tiny.yaml data.shards=SHARDS run_dir=runs/tiny
    torchrun --nproc_per_node=2 cli.py train --config configs/stage1_tiny.yaml data.shards=SHARDS
    python cli.py train --config configs/stage2_tiny.yaml init_from=runs/tiny/export

One node, 8 GPUs::

    torchrun --nproc_per_node=8 cli.py train --config configs/stage1_vit-g_7b.yaml
    deepspeed --num_gpus 8 cli.py train --config configs/stage1_vit-g_7b.yaml
    torchrun --nproc_per_node=8 cli.py train --config configs/stage2_vit-g_7b.yaml

Several nodes: ``srun`` one task per GPU with MASTER_ADDR/MASTER_PORT exported (pipeline.distributed).

Restarting the same command resumes from the newest complete checkpoint in ``run_dir`` with the same
losses as a run that never stopped (model, optimizer, data cursors and RNG all restored).

The schedule is the original's ``LinearWarmupCosineLRScheduler`` (``lr_at``), set before every
micro-batch's forward; no gradient clipping unless ``optim.grad_clip`` is set (the original clips nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, distributed
from pipeline.config import ConfigError, save_yaml, to_dict
from pipeline.model import ModelConfig, VideoLLaMA, clip_from_frames, encoder_weights_fingerprint
from pipeline.prompts import build_tokenizer
from pipeline.rundir import CONFIG, DS_CONFIG, EXPORT, INIT_FROM, METRICS, MODEL_CONFIG
from pipeline.shards import inspect_shards
from pipeline.tracking import git_commit, make_tracker
from train.config import OptimConfig, TrainConfig
from train.data import TrainStream, check_encoder_weights, make_loader, shard_counts
from train.validation import evaluate_in_training

REPO = Path(__file__).resolve().parents[1]

# Slurm time limit / preemption (slurm/train.sbatch): the batch script forwards STOP_SIGNAL ahead of the
# limit; every rank saves a checkpoint at the next step boundary and exits REQUEUE_EXIT_CODE, the script
# requeues the job and the requeued job resumes from that checkpoint (same run_dir, same MLflow run).
STOP_SIGNAL = signal.SIGUSR1
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"


class StopRequest:
    """A flag set by STOP_SIGNAL, read once per step; ranks agree through the step's all-reduce."""

    def __init__(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(STOP_SIGNAL, self._set)

    def _set(self, signum, frame) -> None:
        self.requested = True


def lr_at(iteration: int, o: OptimConfig, total: int, accum: int = 1) -> float:
    """The original's ``LinearWarmupCosineLRScheduler`` at 0-based micro-batch ``iteration`` of ``total``.

    Warm-up ``min(init, warmup_lr + (init - warmup_lr) * s / W)``, then ``min_lr + (init - min_lr) *
    (1 + cos(pi * s / S)) / 2`` with ``s`` counted from the first step, warm-up included: the cosine
    does not restart after warm-up (stage 1 continues at 9.81e-5, not 1e-4). ``warmup_steps`` counts
    optimizer steps, so with ``accum`` micro-batches per step it spans ``warmup_steps * accum``
    iterations (the original's iterations were micro-batches; its recipes have ``accum`` 1).
    """
    warmup = o.warmup_steps * accum
    if iteration < warmup:
        return min(o.init_lr, o.warmup_lr + (o.init_lr - o.warmup_lr) * iteration / max(warmup, 1))
    return o.min_lr + (o.init_lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * iteration / max(total, 1)))


def param_groups(model: VideoLLaMA, weight_decay: float) -> list[dict[str, Any]]:
    """Only trainable parameters; weight decay on matrices/embeddings (ndim >= 2), none on biases/norms."""
    params = [p for _, p in model.trainable_parameters()]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def ds_config(cfg: TrainConfig, precision: str, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The ZeRO JSON from ds_configs/ with batch sizes, clipping and precision written from ``cfg``."""
    path = Path(cfg.zero_config)
    if not path.is_file() and (REPO / path).is_file():
        path = REPO / path
    if not path.is_file():
        raise ConfigError(f"zero_config: {cfg.zero_config!r} does not exist")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.micro_batch * cfg.grad_accum * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW as client optimizer: no fused-Adam build
    if not on_gpu:
        ds.setdefault("zero_optimization", {})["overlap_comm"] = False  # needs CUDA streams
    return ds


def training_tokenizer(cfg: TrainConfig, mcfg: ModelConfig):
    path = cfg.tokenizer or mcfg.llm_path
    if not path and cfg.model_preset != "tiny":
        raise ConfigError("tokenizer: set tokenizer or model.llm_path (a Hugging Face LLM directory)")
    return build_tokenizer(path)


def build_model(cfg: TrainConfig, mcfg: ModelConfig, verbose: bool = False) -> VideoLLaMA:
    from pipeline.weights import load_frozen_encoder, load_trainable_weights

    torch.manual_seed(cfg.seed)  # same random init on every rank and every restart
    model = VideoLLaMA(mcfg)
    if mcfg.has_encoder_weights:
        load_frozen_encoder(model)
    if cfg.init_from:
        report = load_trainable_weights(model, cfg.init_from)
        if verbose:
            print(f"[train] init_from {cfg.init_from}: {report}", flush=True)
    return model


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of fp32 tensors by name: shows which weights a run started from."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def set_master_weights(model: VideoLLaMA, start: dict[str, torch.Tensor]) -> str:
    """Put the ``init_from`` weights into the optimizer's fp32 master copy and return its checksum.

    With bf16, DeepSpeed casts the module and then copies the fp32 master weights *from the bf16 ones*,
    which would start stage 2 from stage-1 weights rounded to 8 bits of mantissa. Collective: every
    rank calls it.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    held = {}
    for name, p in model.trainable_parameters():
        safe_set_full_fp32_param(p, start[name].to(p.device, torch.float32))
        full = safe_get_full_fp32_param(p)
        held[name] = full if full is not None else p
    return weights_checksum(held)


def check_template(cfg: TrainConfig, mcfg: ModelConfig, rank: int) -> None:
    """Warn when the prompt style looks wrong for the LLM (the original's most asked-about mix-up)."""
    name = Path(cfg.tokenizer or mcfg.llm_path or "").name.lower().replace("_", "-")
    llama2_chat = ("llama-2" in name or "llama2" in name) and "chat" in name
    if (
        rank == 0
        and cfg.data.task == "conversation"
        and name
        and (cfg.data.template == "vicuna") == llama2_chat
    ):
        print(
            f"[train] warning: data.template={cfg.data.template} for the LLM {name!r}: LLaMA-2-chat "
            "models need 'llama2', Vicuna/LLaMA 'vicuna'",
            flush=True,
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past the resumed step, so the file reads like one uninterrupted run."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def run(cfg: TrainConfig) -> dict[str, Any]:
    import deepspeed

    mcfg = cfg.model_config()
    specs = cfg.data.specs()
    datasets = [(shard_counts(s.shards), s.weight) for s in specs]  # refuses missing folders
    keys = [f"data.datasets[{i}].num_frames" for i in range(len(specs))] if cfg.data.datasets else []
    kinds = {
        inspect_shards(s.shards, cfg.data.input, s.num_frames, mcfg, *keys[i : i + 1]).kind
        for i, s in enumerate(specs)
    }
    if len(kinds) > 1:
        raise ConfigError("data.datasets: mixes frame shards and feature shards; use one kind for all")
    kind = kinds.pop()

    info = distributed.init()  # after the checks: a config error exits with one line, on every rank
    rank, world = info.rank, info.world_size
    run_dir = Path(cfg.run_dir)
    total = sum(n for shards, _ in datasets for _, n in shards)
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    steps_per_epoch = cfg.steps_per_epoch or max(1, total // global_batch)
    max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if info.device.type == "cuda" else "fp32")
    )

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / CONFIG)
        save_yaml(mcfg, run_dir / MODEL_CONFIG)
    distributed.barrier()

    model = build_model(cfg, mcfg, verbose=rank == 0)
    if kind == "features":  # before DeepSpeed casts the module: the cache hashed the encoder as built
        check_encoder_weights([s.shards for s in specs], encoder_weights_fingerprint(model))
        eval_frames = (
            cfg.eval.shards and inspect_shards(cfg.eval.shards, setting="eval.shards").kind == "frames"
        )
        freed = 0 if eval_frames else model.drop_frozen_encoder()  # never runs on features: off the GPU
        if rank == 0 and freed:
            print(
                f"[train] cached features: frozen encoder not loaded on the device ({freed:,} params)",
                flush=True,
            )
    start = {n: p.detach().clone() for n, p in model.trainable_parameters()} if cfg.init_from else None
    tokenizer = training_tokenizer(cfg, mcfg)
    check_template(cfg, mcfg, rank)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.warmup_lr, betas=o.betas, eps=o.eps
    )
    ds = ds_config(cfg, precision, world, info.device.type == "cuda")
    if rank == 0:
        (run_dir / DS_CONFIG).write_text(json.dumps(ds, indent=2))
    if info.local_rank == 0 and (build_dir := distributed.comm_op_build_pending()):
        print(
            f"[train] first DeepSpeed run here: compiling its CPU comm op into {build_dir} "
            "(25-70 s, once; set TORCH_EXTENSIONS_DIR to share the build between checkouts)",
            flush=True,
        )
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    init_checksum = set_master_weights(model, start) if start is not None else None
    del start

    step, samples_seen = 0, 0
    workers = max(cfg.data.workers, 1)
    cursors, skipped = None, {}
    resume_from = checkpoint.latest(run_dir)
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from, rank, world)
        step, samples_seen, cursors = state["step"], state["samples_seen"], state["cursors"]
        skipped = state.get("skipped", {})
        if rank == 0:
            print(f"[train] resumed from {resume_from} at step {step}", flush=True)
        if len(cursors) != workers:
            raise ConfigError(
                f"data.workers: the checkpoint has {len(cursors)} workers per rank, now {workers}"
            )
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # dropout differs across ranks, fixed by the seed
    if rank == 0:
        _truncate_metrics(run_dir / METRICS, step)
    stream = TrainStream(
        datasets,
        kind=kind,
        tokenizer=tokenizer,
        mcfg=mcfg,
        micro_batch=cfg.micro_batch,
        max_caption_tokens=cfg.data.max_caption_tokens,
        task=cfg.data.task,
        template=cfg.data.template,
        max_len=cfg.data.max_len,
        label_mask=cfg.data.label_mask,
        rank=rank,
        world_size=world,
        workers=cfg.data.workers,
        seed=cfg.data.seed if cfg.data.seed is not None else cfg.seed,
        cursors=cursors,
        offset=sum(c["batches"] for c in cursors) % workers if cursors else 0,
    )
    cursors = [dict(c) for c in stream.cursors]
    stop = StopRequest()  # before the loader forks its workers, so they inherit the handler
    batches = iter(make_loader(stream, cfg.data.workers, cfg.data.prefetch))

    tracker = make_tracker(rank == 0, cfg.tracking, run_dir, cfg.experiment, cfg.tracking_uri, cfg.run_name)
    if resume_from is None:
        tracker.log_params({**to_dict(cfg), "resolved": {"model": to_dict(mcfg), "max_steps": max_steps}})
        tags = {"git_commit": git_commit(REPO), "world_size": world, "input": kind, "task": cfg.data.task}
        if init_checksum is not None:  # the trainable weights at step 0, as the optimizer holds them
            tags.update(init_from=str(cfg.init_from), init_weights_checksum=init_checksum)
            if rank == 0:
                (run_dir / INIT_FROM).write_text(
                    json.dumps({"init_from": str(cfg.init_from), "checksum": init_checksum}) + "\n"
                )
        tracker.set_tags(tags)
        tracker.log_artifact(run_dir / CONFIG)
    else:
        tracker.set_tags({f"resumed_at_step_{step}": resume_from.name})

    def export(out: Path) -> None:
        from pipeline.weights import export_trainable

        export_trainable({k: v.float() for k, v in model.trainable_state_dict().items()}, mcfg, out)

    def save(at: int) -> Path:
        state = {
            "step": at,
            "samples_seen": samples_seen,
            "cursors": cursors,
            "world_size": world,
            "skipped": {"errors": errors_total, "too_long": too_long_total},
        }
        return checkpoint.save(engine, run_dir, at, rank, state, export, cfg.keep_last)

    engine.train()
    errors_total, too_long_total = skipped.get("errors", 0), skipped.get("too_long", 0)
    last_saved, loss = None, float("nan")
    while step < max_steps:
        t_step = time.perf_counter()
        wait = loss_sum = 0.0
        tokens = samples = errors = too_long = 0
        for micro in range(cfg.grad_accum):
            lr = lr_at(step * cfg.grad_accum + micro, o, max_steps * cfg.grad_accum, cfg.grad_accum)
            for group in optimizer.param_groups:
                group["lr"] = lr  # before the forward, as the original; the last one is the step's
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            cursors[batch["slot"]] = batch["cursor"]
            errors += batch["errors"]
            too_long += batch["too_long"]
            inputs = {
                k: batch[k].to(info.device) for k in ("input_ids", "attention_mask", "video_mask", "labels")
            }
            if kind == "frames":
                inputs["clip"] = clip_from_frames(batch["frames"].to(info.device), dtype)
            else:
                inputs["features"] = batch["features"].to(info.device, dtype)
            out = engine(**inputs)
            engine.backward(out.loss)
            engine.step()
            loss_sum += out.loss.item()
            tokens += int(inputs["attention_mask"].sum())
            samples += inputs["input_ids"].shape[0]
        step += 1
        grad_norm = engine.get_global_grad_norm()
        stats = torch.tensor(
            [loss_sum / cfg.grad_accum, tokens, samples, errors, wait, stop.requested, too_long],
            dtype=torch.float64,
        )
        distributed.all_reduce_sum(stats)
        stop_now = stats[5].item() > 0 and step < max_steps
        dt = time.perf_counter() - t_step
        loss = stats[0].item() / world
        samples_seen += int(stats[2])
        errors_total += int(stats[3])
        too_long_total += int(stats[6])
        if rank == 0:
            wait_s = stats[4].item() / world
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "samples_per_s": stats[2].item() / dt,
                "tokens_per_s": stats[1].item() / dt,
                "step_time_s": dt,
                "data_wait_s": wait_s,
                "compute_s": dt - wait_s,
                "data_errors": errors_total,  # unreadable / unusable samples skipped, all ranks
                "data_too_long": too_long_total,  # conversations skipped: no fit in data.max_len
                "samples_seen": samples_seen,
                "epoch": step / steps_per_epoch,
            }
            with open(run_dir / METRICS, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if step % cfg.log_every == 0 or step == max_steps:
                tracker.log_metrics(metrics, step)
                print(
                    f"[train] step {step}/{max_steps} loss {loss:.4f} lr {lr:.2e} "
                    f"{metrics['samples_per_s']:.1f} samples/s data {wait_s:.2f}s",
                    flush=True,
                )
        if cfg.eval.shards and (step % cfg.eval.every == 0 or step == max_steps):
            evaluate_in_training(model, tokenizer, cfg.eval, step, rank, world, run_dir, tracker, info.device)
        if step % cfg.save_every == 0 or step == max_steps or stop_now:
            last_saved = save(step)
        if stop_now:
            if rank == 0:
                print(
                    f"[train] stop signal: saved step {step}, exit {REQUEUE_EXIT_CODE} to requeue", flush=True
                )
            tracker.close("KILLED")
            distributed.cleanup()
            raise SystemExit(REQUEUE_EXIT_CODE)

    if rank == 0 and last_saved is not None:
        final = run_dir / EXPORT
        shutil.copytree(last_saved / EXPORT, final, dirs_exist_ok=True)
        tracker.log_artifact(final, "export")
    tracker.close()
    distributed.cleanup()
    return {
        "steps": step,
        "max_steps": max_steps,
        "loss": loss,
        "samples_seen": samples_seen,
        "input": kind,
        "run_dir": str(run_dir),
        "rank": rank,
    }
