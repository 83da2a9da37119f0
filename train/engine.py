"""What the training loop runs on: the model as a run builds it, the optimizer and its schedule, and the
DeepSpeed engine with the ZeRO JSON from ds_configs/ completed from the typed config.

The schedule is the original's ``LinearWarmupCosineLRScheduler`` (``lr_at``), set once per optimizer
step by the global step (``step_lr``); no gradient clipping unless ``optim.grad_clip`` is set (the original clips nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.config import ConfigError
from pipeline.distributed import DistInfo
from pipeline.model import ModelConfig, VideoLLaMA
from pipeline.prompts import build_tokenizer, original_mask_drift
from pipeline.rundir import DS_CONFIG
from train.config import OptimConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


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


def step_lr(step: int, o: OptimConfig, max_steps: int, accum: int) -> float:
    """The learning rate of 0-based optimizer step ``step``: ``lr_at`` at the step's last micro-batch
    (the one whose ``engine.step`` updates) with the configured ``accum``. A function of the global step
    alone: a resume on another world size, with another accumulation, continues the same schedule."""
    return lr_at(step * accum + accum - 1, o, max_steps * accum, accum)


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


def build_engine(cfg: TrainConfig, model: VideoLLaMA, precision: str, info: DistInfo, run_dir: Path):
    """(DeepSpeed engine, its optimizer): AdamW over the trainable parameters, ZeRO from ``ds_config``;
    rank 0 writes the config as used into the run folder."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.warmup_lr, betas=o.betas, eps=o.eps
    )
    ds = ds_config(cfg, precision, info.world_size, info.device.type == "cuda")
    if info.is_main:
        (run_dir / DS_CONFIG).write_text(json.dumps(ds, indent=2))
    if info.local_rank == 0 and (build_dir := distributed.comm_op_build_pending()):
        print(
            f"[train] first DeepSpeed run here: compiling its CPU comm op into {build_dir} "
            "(25-70 s, once; set TORCH_EXTENSIONS_DIR to share the build between checkouts)",
            flush=True,
        )
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, optimizer


def training_tokenizer(cfg: TrainConfig, mcfg: ModelConfig):
    path = cfg.tokenizer or mcfg.llm_path
    if not path and cfg.model_preset != "tiny":
        raise ConfigError("tokenizer: set tokenizer or model.llm_path (a Hugging Face LLM directory)")
    return build_tokenizer(path)


def check_template(cfg: TrainConfig, mcfg: ModelConfig, is_main: bool) -> None:
    """Warn when the prompt style looks wrong for the LLM (the original's most asked-about mix-up)."""
    name = Path(cfg.tokenizer or mcfg.llm_path or "").name.lower().replace("_", "-")
    llama2_chat = ("llama-2" in name or "llama2" in name) and "chat" in name
    if (
        is_main
        and cfg.data.task == "conversation"
        and name
        and (cfg.data.template == "vicuna") == llama2_chat
    ):
        print(
            f"[train] warning: data.template={cfg.data.template} for the LLM {name!r}: LLaMA-2-chat "
            "models need 'llama2', Vicuna/LLaMA 'vicuna'",
            flush=True,
        )


def check_label_mask(cfg: TrainConfig, tokenizer, is_main: bool) -> None:
    """Warn when the original's label masking drops answer tokens with this tokenizer (not LLaMA's)."""
    if not (is_main and cfg.data.task == "conversation" and cfg.data.label_mask == "original"):
        return
    if drift := original_mask_drift(tokenizer, cfg.data.template):
        print(f"[train] warning: {drift}", flush=True)


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
