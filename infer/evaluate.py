"""Held-out evaluation: caption loss / perplexity, and caption metrics against the reference captions.

    python cli.py evaluate runs/stage1 VAL_SHARDS                       # loss + perplexity
    python cli.py evaluate runs/stage1 VAL_SHARDS --metrics --max-samples 500 --track runs/stage1
    python cli.py evaluate runs/stage1 VAL_SHARDS --metrics --predictions preds.jsonl

Loss, perplexity and (``--metrics``, greedy captions by default) exact match, BLEU, chrF and CIDEr are
computed by pipeline.evaluation, which training's validation (``eval.shards=VAL eval.every=N``) uses too.
``--track RUN_DIR`` logs ``eval/*`` into that training run's MLflow run at the checkpoint's step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from infer.load import ModelSource, load, resolve
from pipeline.config import ConfigError
from pipeline.evaluation import EvalSettings, score, summarize
from pipeline.generate import GenerationConfig
from pipeline.shards import inspect_shards


def eval_generation() -> GenerationConfig:
    return GenerationConfig(do_sample=False, max_new_tokens=48)


@dataclass
class EvaluateConfig(EvalSettings):
    """The evaluation settings (pipeline.evaluation.EvalSettings: shards, batch_size, max_caption_tokens,
    max_samples, metrics) plus the model, the greedy generation and where the results go."""

    model: ModelSource = field(default_factory=ModelSource)
    generation: GenerationConfig = field(default_factory=eval_generation)
    input: Literal["auto", "frames", "features"] = "auto"
    predictions: str | None = None  # write {key, videoid, reference, prediction} JSONL here
    track: str | None = None  # a training run directory: log into its MLflow run
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in the run directory
    step: int | None = None  # MLflow step; default: the checkpoint's training step

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("shards: a shard folder is required")
        if self.batch_size < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise ConfigError("batch_size and max_samples must be >= 1")


# ---- entry points -------------------------------------------------------------------------------


def _log_to_run(cfg: EvaluateConfig, metrics: dict[str, float], step: int) -> str:
    """Into the training run's MLflow run (its status is left as it was)."""
    from pipeline.tracking import attached

    if not Path(cfg.track).is_dir():
        raise ConfigError(f"track: run directory {cfg.track!r} does not exist")
    with attached(cfg.track, "videollama-eval", cfg.tracking_uri) as tracker:
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
    return tracker.run_id


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Loss / perplexity (and metrics) of CHECKPOINT on ``cfg.shards``; returns the scores."""
    t0 = time.monotonic()
    resolved = resolve(cfg.model)
    kind = inspect_shards(cfg.shards, cfg.input, mcfg=resolved.mcfg, setting="shards").kind
    loaded = load(cfg.model, resolved)
    scores = score(
        loaded.model, loaded.tokenizer, loaded.device, cfg, kind, cfg.generation if cfg.metrics else None
    )
    preds = scores.predictions
    metrics = summarize(scores.nll, scores.tokens, preds, scores.samples)
    if cfg.predictions and preds:
        Path(cfg.predictions).write_text("".join(json.dumps(p) + "\n" for p in preds))
    step = cfg.step if cfg.step is not None else (resolved.step or 0)
    result: dict[str, Any] = {"checkpoint": str(resolved.weights), "step": step, "input": kind, **metrics}
    if cfg.track:
        result["mlflow_run_id"] = _log_to_run(cfg, metrics, step)
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result
