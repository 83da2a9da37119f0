"""Checkpoints: the training state as named plain data, loadable on any number of processes.

``RUN_DIR/checkpoints/step_00001000/`` holds

* ``train_state.json``: the :class:`TrainState` (step, samples seen, the global data position: samples
  consumed per dataset, the global batch, skip counters) and rank 0's RNG states, as plain JSON;
* ``trainable_state.pt``: the trainable parameters' fp32 master weights and Adam moments, whole (gathered
  from the ZeRO partitions, not per rank) and the Adam step count: with a 7B LLM ~22M parameters' worth,
  12 B each; frozen weights are not saved;
* ``export/``: the trainable-only export (``pipeline.weights.export_trainable``) that inference and
  stage 2 load;
* ``COMPLETE``: written last, after every rank finished, with the size and SHA-256 of every other file
  of the checkpoint; a checkpoint without it is ignored (a run killed while saving resumes from the
  previous one).

Nothing in it depends on the world size: a resume on other ranks re-partitions the optimizer state
(:func:`load`) and continues the global data order at the stored position (train.data).

A resume checks the newest complete checkpoint's files first (:func:`resume_point`): one damaged after it
was written (a truncated trainable state or train-state JSON, bytes that differ from those saved:
``torch.load`` reads a flipped byte inside a tensor without complaint) is set aside as
``checkpoints/broken_step_N`` with a warning and the previous intact one is used; with none intact the
run stops with one line naming the broken file.

Checkpoints written before this format (``train_state_rank{R}.json`` + DeepSpeed's ZeRO files, per-rank
data cursors) are refused in one line (:func:`read_state`): their data order cannot be continued.
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
from pipeline.rundir import (
    CHECKPOINTS,
    COMPLETE,
    EXPORT,
    TRAIN_STATE,
    TRAINABLE_STATE,
    TRAINABLE_WEIGHTS,
    checkpoint_tag,
    train_state_file,
)
from pipeline.shards import write_json
from pipeline.weights import nonfinite_tensors, sha256_file

FORMAT = 2  # 1: per-rank train states and DeepSpeed ZeRO partitions (before elastic resume)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the trainable weights and optimizer; the same on all ranks."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # all ranks
    consumed: list[int] = field(default_factory=list)  # global data position: samples consumed per dataset
    global_batch: int = 0  # micro_batch x grad_accum x world of the run's first start; kept on any world
    world_size: int = 1  # of the process that saved (a resume may have another)
    # all ranks: unusable samples, conversations too long, steps with a non-finite loss or gradient
    skipped: dict[str, int] = field(default_factory=lambda: {"errors": 0, "too_long": 0, "nonfinite": 0})
    format: int = FORMAT


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
    if not (path / TRAIN_STATE).exists() and (path / train_state_file(0)).exists():
        return []  # written before elastic resume: read_state refuses it in one line
    found, reported = [], set()  # reported: files with a problem already named (no second line for them)
    try:
        json.loads((path / TRAIN_STATE).read_text())
    except (OSError, ValueError) as e:
        found.append(f"{path / TRAIN_STATE} is missing or not valid JSON ({type(e).__name__})")
        reported.add(TRAIN_STATE)
    f = path / TRAINABLE_STATE
    if not f.is_file():
        found.append(f"{f} (trainable weights and optimizer state) is missing")
        reported.add(TRAINABLE_STATE)
    elif msg := _torch_file_problem(f):
        found.append(msg)
        reported.add(TRAINABLE_STATE)
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
    """Collective: every rank calls it; the checkpoint is named by ``state.step``. A full disk is one line
    naming the folder (torch.save says only ``unexpected pos``); the partial checkpoint has no COMPLETE
    marker, so a resume ignores it."""
    try:
        return _save(engine, run_dir, state, rank, export_fn, keep_last)
    except (OSError, RuntimeError) as e:
        if (full := out_of_space(e, Path(run_dir) / CHECKPOINTS / checkpoint_tag(state.step))) is not None:
            raise full from None
        raise


def trainable_state(engine) -> dict[str, Any]:
    """Collective: ``{"adam_step", "params", "exp_avg", "exp_avg_sq"}`` of the trainable parameters, whole
    fp32 tensors by name on every rank (each gathered from the ZeRO partitions: one all-reduce each)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, Any] = {"format": FORMAT, "params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    base = engine.optimizer.optimizer
    stepped = bool(base.state)  # Adam's moments exist after its first step (the same on every rank)
    if stepped:  # DeepSpeed links the moments to the parameters after its first group's first step only
        _relink_moments(engine.optimizer)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        out["params"][name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(p, key) if stepped else None
            out[key][name] = (value if value is not None else torch.zeros_like(p, dtype=torch.float32)).cpu()
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    out["adam_step"] = int(steps[0]) if steps else 0
    return out


def _relink_moments(zero) -> None:
    """Point every parameter's optimizer-state fragments at the Adam moments as they are now. DeepSpeed
    (0.19) links them once, right after the first param group's first step, when the other groups have
    no moments yet: their fragments stay empty and ``safe_get_full_optimizer_state`` fails for them."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def set_trainable_state(engine, saved: dict[str, Any]) -> None:
    """Collective: put whole fp32 master weights and Adam moments into this world's ZeRO partitions
    (and the module's weights, in its dtype). Missing or extra names are refused in one line."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise ConfigError("resume: the trainable state loads into ZeRO stage 1 or 2 only (zero_config)")
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    if set(named) != set(saved["params"]):
        theirs, ours = set(saved["params"]), set(named)
        raise ConfigError(
            f"resume: the checkpoint's trainable parameters differ from the model's (only in the checkpoint: "
            f"{sorted(theirs - ours)[:3]}, only in the model: {sorted(ours - theirs)[:3]})"
        )
    base = zero.optimizer
    for flat in zero.single_partition_of_fp32_groups:  # Adam's state exists after a first step only
        base.state[flat] = {
            "step": torch.tensor(float(saved["adam_step"])),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    _relink_moments(zero)
    with torch.no_grad():
        for name, p in named.items():
            value = saved["params"][name].to(p.device)
            p.data.copy_(value.to(p.dtype))
            safe_set_full_fp32_param(p, value)
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, saved[key][name].to(p.device), key)


def _save(engine, run_dir: str | Path, state: TrainState, rank: int, export_fn, keep_last: int) -> Path:
    step = state.step
    root = Path(run_dir) / CHECKPOINTS
    path = root / checkpoint_tag(step)
    rng = rng_state()
    whole = trainable_state(engine)  # collective
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        write_json({**asdict(state), "rng": rng}, path / TRAIN_STATE)
        torch.save(whole, path / TRAINABLE_STATE)
        if export_fn is not None:
            export_fn(path / EXPORT)
    del whole
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


def read_state(path: str | Path) -> TrainState:
    """The train state of a checkpoint; one written before elastic resume is refused in one line."""
    path = Path(path)
    if not (path / TRAIN_STATE).is_file() and (path / train_state_file(0)).is_file():
        raise ConfigError(
            f"checkpoint {path} was written before elastic resume (per-rank data cursors and ZeRO "
            "partitions, train_state_rank*.json): this version cannot continue its data order; finish the "
            "run with the version that wrote it, or start a new run_dir with "
            f"init_from={path / EXPORT} to keep its weights"
        )
    state = json.loads((path / TRAIN_STATE).read_text())
    return TrainState(**{f.name: state[f.name] for f in fields(TrainState) if f.name in state})


def load(engine, path: str | Path) -> TrainState:
    """Collective: restore the trainable weights, Adam state and RNG (rank 0's, on every rank); returns
    the train state. Works on any number of processes."""
    path = Path(path)
    state = read_state(path)
    saved = torch.load(path / TRAINABLE_STATE, map_location="cpu", weights_only=True)
    set_trainable_state(engine, saved)
    set_rng_state(json.loads((path / TRAIN_STATE).read_text())["rng"])
    return state


def checkpoint_bytes(path: str | Path, include_export: bool = False) -> int:
    path = Path(path)
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and (include_export or EXPORT not in p.relative_to(path).parts)
    )
