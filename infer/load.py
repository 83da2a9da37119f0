"""CHECKPOINT -> a model ready for inference: trainable weights + frozen encoder + LLM + tokenizer.

CHECKPOINT is one of

* a training run directory: its newest export, ``RUN/export`` or ``RUN/checkpoints/step_N/export``;
* a trainable export directory (``trainable.safetensors`` + ``model.yaml``);
* a released Video-LLaMA checkpoint (``.pth``), converted on the fly (pipeline.weights).

The frozen parts come from local directories named in the export's ``model.yaml``, overridable
(``--llm DIR``, ``--blip2 DIR``, ``model.KEY=VALUE``). A model trained without ``llm_path`` (the tiny
preset) has a random LLM; it is rebuilt from the training seed (the run's ``config.yaml``, else 42),
which reproduces the frozen weights the run trained against.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.config import ConfigError, WeightPaths, load_config
from pipeline.model import ModelConfig, VideoLLaMA, preset, vision_for_device
from pipeline.prompts import build_tokenizer
from pipeline.rundir import CHECKPOINTS, COMPLETE, CONFIG, EXPORT, METRICS, MODEL_CONFIG, TRAINABLE_WEIGHTS
from pipeline.weights import WeightsError

DEFAULT_SEED = 42  # TrainConfig's default seed


class CheckpointError(ValueError):
    """A CHECKPOINT argument that cannot be used; the message names the path and what was expected."""


@dataclass
class ModelSource(WeightPaths):
    """Where the weights come from. Every path field (``llm_path`` and the encoder's WeightPaths)
    overrides the checkpoint's ``model.yaml``; one encoder source replaces the other."""

    checkpoint: str = ""
    llm_path: str | None = None
    tokenizer: str | None = None  # default: the run's tokenizer, else llm_path, else the tiny one
    preset: str | None = None  # base ModelConfig for a .pth (default: inferred from its shapes)
    config: dict[str, Any] = field(default_factory=dict)  # further ModelConfig keys, e.g. llm_dtype
    seed: int | None = None  # rebuilds a random (no llm_path) LLM; default: the run's seed
    device: str = "auto"  # auto: cuda when available


@dataclass
class Resolved:
    """What CHECKPOINT points at, before any weights are read into a model."""

    weights: Path  # export directory or .pth file
    mcfg: ModelConfig
    run_config: dict[str, Any]  # the training run's config.yaml, when found
    step: int | None  # training step of the export, when known


@dataclass
class Loaded:
    model: VideoLLaMA
    tokenizer: Any
    device: torch.device
    resolved: Resolved


def _is_export(path: Path) -> bool:
    return (path / TRAINABLE_WEIGHTS).is_file() and (path / MODEL_CONFIG).is_file()


def latest_export(run_dir: Path) -> Path | None:
    """The newest of ``RUN/export`` and the exports of complete checkpoints (by write time)."""
    found = [run_dir / EXPORT] if _is_export(run_dir / EXPORT) else []
    ckpts = run_dir / CHECKPOINTS
    if ckpts.is_dir():
        found += [
            p / EXPORT for p in ckpts.glob("step_*") if (p / COMPLETE).is_file() and _is_export(p / EXPORT)
        ]
    return max(found, key=lambda p: (p / TRAINABLE_WEIGHTS).stat().st_mtime_ns, default=None)


def _step_of(export: Path, run_dir: Path | None) -> int | None:
    if export.parent.name.startswith("step_"):
        return int(export.parent.name.removeprefix("step_"))
    if run_dir is not None and (run_dir / METRICS).is_file():  # RUN/export = the final step
        lines = (run_dir / METRICS).read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    return None


def _run_config(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / CONFIG).is_file():
        return {}
    return yaml.safe_load((run_dir / CONFIG).read_text()) or {}


def locate(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(export directory or .pth, the training run directory it belongs to if any)."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix not in (".pth", ".pt", ".bin"):
            raise CheckpointError(f"checkpoint {str(path)!r} is a file but not a Video-LLaMA .pth checkpoint")
        return path, None
    if _is_export(path):
        run_dir = path.parent if path.name == EXPORT else None
        if path.parent.name.startswith("step_") and path.parent.parent.name == CHECKPOINTS:
            run_dir = path.parents[2]
        return path, run_dir
    export = latest_export(path)
    if export is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is neither a training run directory (with export/ or "
            "checkpoints/step_N/export), a trainable export (trainable.safetensors + model.yaml), nor a "
            "Video-LLaMA .pth file"
        )
    return export, path


def _overrides(src: ModelSource) -> dict[str, Any]:
    llm = {"llm_path": src.llm_path} if src.llm_path is not None else {}
    return {**llm, **src.weight_overrides(), **src.config}


def resolve(src: ModelSource) -> Resolved:
    """Find the weights and the ModelConfig (with overrides); reads only small files."""
    from pipeline.weights import videollama_checkpoint_config

    weights, run_dir = locate(src.checkpoint)
    if weights.is_dir():
        base = load_config(ModelConfig, weights / MODEL_CONFIG)
    elif src.preset:
        base = preset(src.preset)
    else:
        try:
            base = videollama_checkpoint_config(weights)
        except (WeightsError, RuntimeError, OSError) as e:
            raise CheckpointError(f"checkpoint {str(weights)!r} cannot be read: {e}") from None
    try:
        mcfg = load_config(ModelConfig, values={**dataclasses.asdict(base), **_overrides(src)})
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None
    return Resolved(
        weights, mcfg, _run_config(run_dir), _step_of(weights, run_dir) if weights.is_dir() else None
    )


def check_llm(mcfg: ModelConfig, weights: Path) -> None:
    """Refuse an LLM whose hidden size is not what ``llama_proj`` projects to, before loading it."""
    if not mcfg.llm_path:
        return
    if not Path(mcfg.llm_path).is_dir():
        raise ConfigError(f"model.llm_path: LLM directory {mcfg.llm_path!r} does not exist")
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(mcfg.llm_path).get_text_config().hidden_size
    if hidden != mcfg.llm_hidden_size:
        raise ConfigError(
            f"the LLM at {mcfg.llm_path!r} has hidden size {hidden} but the checkpoint {str(weights)!r} "
            f"projects video tokens to {mcfg.llm_hidden_size} (llama_proj): use the LLM it was trained "
            "with (7B LLaMA/Vicuna: 4096, 13B: 5120)"
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(src: ModelSource, resolved: Resolved | None = None) -> Loaded:
    """Build the model, load frozen encoder + trainable weights, move it to the device in eval mode."""
    from pipeline.weights import load_frozen_encoder, load_trainable_weights

    r = resolved or resolve(src)
    check_llm(r.mcfg, r.weights)
    seed = src.seed if src.seed is not None else int(r.run_config.get("seed", DEFAULT_SEED))
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # as the training run built it: same random frozen parts
        model = VideoLLaMA(r.mcfg)
    if r.mcfg.has_encoder_weights:
        load_frozen_encoder(model)
    load_trainable_weights(model, r.weights)
    device = pick_device(src.device)
    vision_for_device(model, device)
    model.to(device).eval()
    tokenizer = build_tokenizer(src.tokenizer or r.run_config.get("tokenizer") or r.mcfg.llm_path)
    return Loaded(model, tokenizer, device, r)
