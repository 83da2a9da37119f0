"""Checkpoint save / load time and bytes at real size: today's world-size-independent format against the
DeepSpeed ZeRO-2 checkpoint the project wrote before elastic resume (issue 24).

    python benchmarks/checkpoint_bench.py [--repeats 3]
    torchrun --nproc_per_node=2 benchmarks/checkpoint_bench.py     (the same over 2 processes)

The trainable part of the vit-g-7b preset is built as the run builds it (video Q-Former, its query tokens,
the frame position embedding, llama_proj to a 4096-wide LLM: 22,104,064 parameters), without the frozen
encoder and LLM, which no checkpoint holds. One AdamW step through a DeepSpeed ZeRO-2 engine fills the
Adam moments; then each format is saved and loaded ``--repeats`` times (the best time is printed):

* ``deepspeed``: ``engine.save_checkpoint`` / ``engine.load_checkpoint`` (module weights + one optimizer
  partition per rank: loadable on the same number of processes only);
* ``elastic``: ``train.checkpoint.trainable_state`` + ``torch.save`` by rank 0 / ``torch.load`` +
  ``set_trainable_state`` (whole fp32 master weights + Adam moments: loadable on any number).

After each load the weights and moments are compared with those saved (bit for bit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def trainable_module():
    import torch
    from torch import nn
    from transformers import Blip2QFormerModel

    from pipeline.model import preset, video_qformer_config

    cfg = preset("vit-g-7b")

    class Trainable(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg.feature_dim
            self.video_qformer = Blip2QFormerModel(video_qformer_config(cfg))
            self.video_query_tokens = nn.Parameter(torch.zeros(1, cfg.num_video_query_tokens, d))
            self.video_frame_position_embedding = nn.Embedding(cfg.max_frames, d)
            self.llama_proj = nn.Linear(d, cfg.llm_hidden_size)

        def forward(self, x):
            return self.llama_proj(x + self.video_query_tokens).sum()

    torch.manual_seed(0)
    return Trainable(), cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")

    import deepspeed
    import torch
    import torch.distributed as dist

    from train import checkpoint

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, cfg = trainable_module()
    n = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    )
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds)
    x = torch.randn(4, cfg.num_video_query_tokens, cfg.feature_dim)
    engine.backward(engine(x))
    engine.step()

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    reference = checkpoint.trainable_state(engine)

    def same() -> bool:
        now = checkpoint.trainable_state(engine)
        return all(
            torch.equal(now[k][name], reference[k][name])
            for k in ("params", "exp_avg", "exp_avg_sq")
            for name in reference[k]
        )

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    def ds_save(path: Path):
        engine.save_checkpoint(str(path), tag="t", save_latest=False)

    def ds_load(path: Path):
        engine.load_checkpoint(str(path), tag="t", load_optimizer_states=True, load_lr_scheduler_states=False)

    def el_save(path: Path):
        whole = checkpoint.trainable_state(engine)
        if rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            torch.save(whole, path / "trainable_state.pt")
        dist.barrier()

    def el_load(path: Path):
        checkpoint.set_trainable_state(
            engine, torch.load(path / "trainable_state.pt", map_location="cpu", weights_only=True)
        )

    rows = []
    for name, save, load in (("deepspeed", ds_save, ds_load), ("elastic", el_save, el_load)):
        saves, loads = [], []
        for i in range(args.repeats):
            path = root / f"{name}_{i}"
            dist.barrier()
            t0 = time.perf_counter()
            save(path)
            dist.barrier()
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load(path)
            dist.barrier()
            loads.append(time.perf_counter() - t0)
            assert same(), f"{name}: the loaded state differs from the saved one"
        bytes_ = size(root / f"{name}_0")
        rows.append((name, min(saves), min(loads), bytes_))
    if rank == 0:
        print(f"trainable parameters: {n:,}; processes: {world}; fp32 module (CPU)")
        print("| format | save s | load s | checkpoint bytes | B / param | loads on another world size |")
        print("|---|---:|---:|---:|---:|---|")
        for name, s, ld, b in rows:
            other = "yes" if name == "elastic" else "no"
            print(f"| {name} | {s:.2f} | {ld:.2f} | {b:,} | {b / n:.2f} | {other} |")
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
