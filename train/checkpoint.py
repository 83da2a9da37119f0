"""Checkpoints: a few functions around the DeepSpeed engine checkpoint.

``RUN_DIR/checkpoints/step_00001000/`` holds

* the DeepSpeed checkpoint without frozen weights (trainable params + ZeRO optimizer partitions): with a
  7B LLM that is ~22M parameters' worth of weights and Adam state, not 7B;
* ``train_state_rank{R}.json``: this rank's :class:`TrainState` (step, samples seen, data cursors, skip
  counters, world size) and RNG states, as plain JSON;
* ``export/``: the trainable-only export (``pipeline.weights.export_trainable``) that inference and
  stage 2 load;
* ``COMPLETE``: written last, after every rank finished, with the size and SHA-256 of every other file
  of the checkpoint; a checkpoint without it is ignored (a run killed while saving resumes from the
  previous one).

A resume checks the newest complete checkpoint's files first (:func:`resume_point`): one damaged after it
was written (a truncated optimizer state or train-state JSON, a missing model-state file, bytes that
differ from those saved: ``torch.load`` reads a flipped byte inside a tensor without complaint) is set
aside as ``checkpoints/broken_step_N`` with a warning and the previous intact one is used; with none
intact the run stops with one line naming the broken file.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import random
import shutil
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, out_of_space
from pipeline.distributed import barrier
from pipeline.rundir import CHECKPOINTS, COMPLETE, EXPORT, TRAINABLE_WEIGHTS, checkpoint_tag, train_state_file
from pipeline.shards import write_json
from pipeline.weights import nonfinite_tensors, sha256_file


@dataclass
class TrainState:
    """Everything a resumed run needs besides the engine's weights and optimizer, for one rank."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # all ranks
    cursors: list[dict[str, Any]] = field(default_factory=list)  # per loader worker of this rank (train.data)
    world_size: int = 1  # resuming needs the same number of processes (cursors, ZeRO partitions)
    # all ranks: unusable samples, conversations too long, steps with a non-finite loss or gradient
    skipped: dict[str, int] = field(default_factory=lambda: {"errors": 0, "too_long": 0, "nonfinite": 0})


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


class BrokenCheckpoint(ConfigError):
    """No complete checkpoint of the run can be resumed from; the message names the damaged file."""


def _torch_file_problem(path: Path) -> str | None:
    """torch.save files are zip archives with the directory at the end: a cut-short file has none."""
    try:
        with zipfile.ZipFile(path) as z:
            end = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
        return None if end <= path.stat().st_size else f"{path} is cut short"
    except (OSError, zipfile.BadZipFile) as e:
        return f"{path} is not a complete torch file ({type(e).__name__})"


def file_digests(path: Path) -> dict[str, list]:
    """``{relative path: [bytes, sha256]}`` of every file in a checkpoint folder but ``COMPLETE``."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != COMPLETE)
    return {f.relative_to(path).as_posix(): [f.stat().st_size, sha256_file(f)] for f in files}


def _changed_files(path: Path, skip: set[str]) -> list[str]:
    """Files missing, or whose size or SHA-256 differ from those ``COMPLETE`` recorded at save time,
    except the export (a resume does not read it) and those matching ``skip`` (already named).
    Checkpoints written before the digests were recorded have none to compare."""
    try:
        recorded = json.loads((path / COMPLETE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return [f"{path / COMPLETE} is not valid JSON"]
    found = []
    for rel, (size, digest) in recorded.items():
        f = path / rel
        if rel.startswith(f"{EXPORT}/") or any(fnmatch.fnmatchcase(rel, pattern) for pattern in skip):
            continue
        if not f.is_file():
            found.append(f"{f} is missing ({COMPLETE} lists it)")
        elif f.stat().st_size != size or sha256_file(f) != digest:
            found.append(
                f"{f} does not hold the bytes it was saved with (its SHA-256 differs from {COMPLETE}'s)"
            )
    return found


def problems(path: str | Path) -> list[str]:
    """What is missing or damaged in a complete checkpoint (empty: it can be resumed from)."""
    path = Path(path)
    try:
        world = int(json.loads((path / train_state_file(0)).read_text()).get("world_size", 1))
    except (OSError, ValueError, AttributeError) as e:
        return [f"{path / train_state_file(0)} is missing or not valid JSON ({type(e).__name__})"]
    found, reported = [], set()  # reported: files with a problem already named (no second line for them)
    for rank in range(1, world):
        try:
            json.loads((path / train_state_file(rank)).read_text())
        except (OSError, ValueError) as e:
            found.append(f"{path / train_state_file(rank)} is missing or not valid JSON ({type(e).__name__})")
            reported.add(train_state_file(rank))
    torch_files = [("model states", "mp_rank_00_model_states.pt")]
    torch_files += [
        ("optimizer state", f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in range(world)
    ]
    for what, pattern in torch_files:
        matches = sorted(path.glob(pattern))
        if not matches:
            found.append(f"{path / pattern} ({what}) is missing")
            reported.add(pattern)
        for f in matches:
            if msg := _torch_file_problem(f):
                found.append(msg)
                reported.add(f.relative_to(path).as_posix())
    return found + _changed_files(path, reported) + _nonfinite_weights(path)


def _nonfinite_weights(path: Path) -> list[str]:
    """A checkpoint of a diverged run (saved before non-finite steps were stopped) is not resumed from:
    its trainable weights, as its export holds them, must all be finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    export = path / EXPORT / TRAINABLE_WEIGHTS
    try:
        bad = nonfinite_tensors(load_file(export)) if export.is_file() else []
    except (OSError, SafetensorError):
        return []  # an unreadable export does not stop a resume, which never reads it
    return [f"{export} holds non-finite weights (NaN or inf in {', '.join(bad[:3])})"] if bad else []


def resume_point(run_dir: str | Path, rank: int) -> Path | None:
    """Collective: the newest complete checkpoint whose files are intact, or None for a fresh run.

    Newer ones that are damaged are renamed ``broken_step_N`` (so nothing resumes from or exports them
    later) with a warning; when every complete checkpoint is damaged, :class:`BrokenCheckpoint`.
    """
    done = complete_checkpoints(run_dir)
    broken: list[tuple[Path, list[str]]] = []
    chosen = None
    for path in reversed(done):
        if not (found := problems(path)):
            chosen = path
            break
        broken.append((path, found))
    if broken and chosen is None:  # nothing moved: every rerun stops with the same line
        raise BrokenCheckpoint(
            f"no intact checkpoint to resume from: {broken[0][1][0]}"
            + (f" (and {len(broken) - 1} older damaged)" if len(broken) > 1 else "")
            + "; restore the file, or remove the checkpoints folder to start over"
        )
    barrier()  # every rank has looked before rank 0 moves anything
    if rank == 0:
        for path, found in broken:
            aside = path.with_name("broken_" + path.name)
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            print(
                f"[train] warning: checkpoint {path.name} is damaged ({'; '.join(found)}); "
                f"moved to {aside.name}, resuming from {chosen.name}",
                flush=True,
            )
    barrier()
    return chosen


def save(
    engine, run_dir: str | Path, state: TrainState, rank: int, export_fn=None, keep_last: int = 2
) -> Path:
    """Collective: every rank calls it, with its own ``state``; the checkpoint is named by ``state.step``.
    A full disk is one line naming the folder (torch.save says only ``unexpected pos``); the partial
    checkpoint has no COMPLETE marker, so a resume ignores it."""
    try:
        return _save(engine, run_dir, state, rank, export_fn, keep_last)
    except (OSError, RuntimeError) as e:
        if (full := out_of_space(e, Path(run_dir) / CHECKPOINTS / checkpoint_tag(state.step))) is not None:
            raise full from None
        raise


def _save(engine, run_dir: str | Path, state: TrainState, rank: int, export_fn, keep_last: int) -> Path:
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
        write_json({"step": step, "files": file_digests(path)}, path / COMPLETE)
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
