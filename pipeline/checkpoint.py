"""Checkpoints: a few functions around the DeepSpeed engine checkpoint.

``RUN_DIR/checkpoints/step_00001000/`` holds

* the DeepSpeed checkpoint without frozen weights (trainable params + ZeRO optimizer partitions): with a
  7B LLM that is ~22M parameters' worth of weights and Adam state, not 7B;
* ``train_state_rank{R}.json``: this rank's :class:`TrainState` (step, samples seen, data cursors, skip
  counters, world size) and RNG states, as plain JSON;
* ``export/``: the trainable-only export (``pipeline.weights.export_trainable``) that inference and
  stage 2 load;
* ``COMPLETE``: written last, after every rank finished; a checkpoint without it is ignored (a run
  killed while saving resumes from the previous one).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.distributed import barrier
from pipeline.rundir import CHECKPOINTS, COMPLETE, EXPORT, checkpoint_tag, train_state_file
from pipeline.shards import write_json


@dataclass
class TrainState:
    """Everything a resumed run needs besides the engine's weights and optimizer, for one rank."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # all ranks
    cursors: list[dict[str, Any]] = field(default_factory=list)  # per loader worker of this rank (train.data)
    world_size: int = 1  # resuming needs the same number of processes (cursors, ZeRO partitions)
    skipped: dict[str, int] = field(default_factory=lambda: {"errors": 0, "too_long": 0})  # all ranks


def rng_state() -> dict[str, Any]:
    """Every RNG the step touches (dropout: torch; anything else: numpy, random) as JSON-able data."""
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [
                torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
                for s in state["cuda"]
            ]
        )


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def latest(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def save(
    engine, run_dir: str | Path, state: TrainState, rank: int, export_fn=None, keep_last: int = 2
) -> Path:
    """Collective: every rank calls it, with its own ``state``; the checkpoint is named by ``state.step``."""
    step = state.step
    root = Path(run_dir) / CHECKPOINTS
    path = root / checkpoint_tag(step)
    path.mkdir(parents=True, exist_ok=True)
    rng = rng_state()
    write_json({**asdict(state), "rng": rng}, path / train_state_file(rank))
    engine.save_checkpoint(
        str(root), tag=checkpoint_tag(step), save_latest=False, exclude_frozen_parameters=True
    )
    if rank == 0 and export_fn is not None:
        export_fn(path / EXPORT)
    barrier()
    if rank == 0:
        write_json({"step": step}, path / COMPLETE)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in root.glob("step_*"):  # left by a run killed while saving
            if not (partial / COMPLETE).exists() and partial.name < path.name:
                shutil.rmtree(partial, ignore_errors=True)
    barrier()
    set_rng_state(rng)  # saving must not change the run: a resumed run starts from exactly this state
    return path


def load(engine, path: str | Path, rank: int, world_size: int) -> TrainState:
    """Restore engine (trainable weights + optimizer) and this rank's RNG; returns its train state."""
    path = Path(path)
    state_file = path / train_state_file(rank)
    if not state_file.is_file():
        raise RuntimeError(f"{path} has no state for rank {rank}: resume with the same number of processes")
    state = json.loads(state_file.read_text())
    if state.get("world_size", world_size) != world_size:
        raise RuntimeError(
            f"{path} was written by {state['world_size']} processes, this run has {world_size}: "
            "resume with the same number of processes (the data cursors and ZeRO partitions are per rank)"
        )
    engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_strict=False,  # the frozen weights are not in it by design
        load_optimizer_states=True,
        load_lr_scheduler_states=False,  # the lr is set from the step every step
    )
    set_rng_state(state.pop("rng"))
    return TrainState(**{f.name: state[f.name] for f in fields(TrainState) if f.name in state})


def checkpoint_bytes(path: str | Path, include_export: bool = False) -> int:
    path = Path(path)
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and (include_export or EXPORT not in p.relative_to(path).parts)
    )
