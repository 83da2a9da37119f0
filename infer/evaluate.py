"""Held-out evaluation: caption loss / perplexity, and caption metrics against the reference captions.

    python cli.py evaluate runs/stage1 VAL_SHARDS                       # loss + perplexity
    python cli.py evaluate runs/stage1 VAL_SHARDS --metrics --max-samples 500 --track runs/stage1
    python cli.py evaluate runs/stage1 VAL_SHARDS --metrics --predictions preds.jsonl

* Loss: the stage-1 training loss (``[BOS] <video> caption\\n``, at most ``max_caption_tokens``) summed
  over every caption token of the shard set and divided by their number; perplexity = exp(loss).
* Metrics (``--metrics``): captions generated with greedy decoding (default) for each clip, scored
  against the shard's caption: exact match (the fraction of cleaned captions equal to the reference),
  sacrebleu (corpus BLEU-4 and chrF) and pycocoevalcap's CIDEr-D
  scorer (pure Python; its Java PTB tokenizer is not used: both sides are cleaned like the training
  captions, i.e. lower-case with punctuation removed). CIDEr needs many clips to mean anything (its IDF
  comes from the references).
* ``--track RUN_DIR`` logs ``eval/*`` into that training run's MLflow run at the checkpoint's step.

Inside training (``eval.shards=VAL eval.every=N``), train/loop.py calls :func:`evaluate_in_training`:
every rank scores its share of the shards, the sums are all-reduced, rank 0 logs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from infer.generate import GenerationConfig
from infer.load import Loaded, ModelSource, load, resolve
from pipeline.config import ConfigError
from pipeline.prompts import caption_sample, collate
from pipeline.shards import list_shards, read_shard

EVAL_FILE = "eval.jsonl"  # in a training run directory: one line per evaluation


def eval_generation() -> GenerationConfig:
    return GenerationConfig(do_sample=False, max_new_tokens=48)


@dataclass
class EvaluateConfig:
    model: ModelSource = field(default_factory=ModelSource)
    generation: GenerationConfig = field(default_factory=eval_generation)
    shards: str = ""
    input: Literal["auto", "frames", "features"] = "auto"
    batch_size: int = 8
    max_caption_tokens: int = 32
    max_samples: int | None = None  # the first N samples (in shard order)
    metrics: bool = False  # also generate captions and score them (BLEU, chrF, CIDEr)
    predictions: str | None = None  # write {key, videoid, reference, prediction} JSONL here
    track: str | None = None  # a training run directory: log into its MLflow run
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in the run directory
    step: int | None = None  # MLflow step; default: the checkpoint's training step

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("shards: a shard folder is required")
        if self.batch_size < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise ConfigError("batch_size and max_samples must be >= 1")


# ---- data ---------------------------------------------------------------------------------------


def shard_kind(folder: str, want: str, mcfg) -> str:
    from train.data import check_shards, first_sample

    if not Path(folder).is_dir():
        raise ConfigError(f"shards: folder {folder!r} does not exist")
    sample = first_sample(folder)
    if sample is None:
        raise ConfigError(f"shards: {folder!r} holds no samples")
    feats = sample.get("features")
    num_frames = feats.shape[-3] if feats is not None else sample["frames"].shape[-4]
    return check_shards(folder, want, num_frames, mcfg)


def iter_samples(
    folder: str, kind: str, max_samples: int | None = None, rank: int = 0, world: int = 1
) -> Iterator[dict[str, Any]]:
    """Samples with a caption and the input ``kind``: the first ``max_samples``, this rank's share."""
    n = 0
    for path in list_shards(folder):
        for s in read_shard(path):
            if not s.get("caption") or s.get(kind) is None:
                continue
            if max_samples is not None and n >= max_samples:
                return
            if n % world == rank:
                yield s
            n += 1


def batches(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def model_input(model, samples: list[dict[str, Any]], kind: str, device: torch.device) -> torch.Tensor:
    """Frozen-encoder features [B,T,Q,D] of frames or cached features (first view when several)."""
    from pipeline.model import clip_from_frames

    ndim = 4 if kind == "frames" else 3
    x = np.stack([s[kind] if s[kind].ndim == ndim else s[kind][0] for s in samples])
    if kind == "features":
        return torch.from_numpy(x).float().to(device)
    return model.encode_frames(clip_from_frames(x).to(device))


# ---- scores -------------------------------------------------------------------------------------


@torch.no_grad()
def caption_nll(model, tokenizer, batch: list[dict[str, Any]], kind: str, max_caption_tokens: int, device):
    """(summed negative log-likelihood, number of caption tokens) of one batch, as the training loss."""
    text = [
        caption_sample(
            tokenizer,
            s["caption"],
            num_video_tokens=model.cfg.num_video_query_tokens,
            max_caption_tokens=max_caption_tokens,
        )
        for s in batch
    ]
    inputs = {k: v.to(device) for k, v in collate(text, tokenizer.pad_token_id).items()}
    feats = model_input(model, batch, kind, device)
    out = model(**inputs, features=feats)
    tokens = int((inputs["labels"][:, 1:] != -100).sum())
    return float(out.loss) * tokens, tokens


def caption_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-4 and chrF (sacrebleu), CIDEr-D (pycocoevalcap) and exact match, one reference per clip.

    Exact match is the fraction of clips whose caption equals the reference string: on a corpus whose
    captions are facts (the grounded sample), it is the accuracy that n-gram overlap blurs.
    """
    import sacrebleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    bleu = sacrebleu.corpus_bleu(predictions, [references])
    chrf = sacrebleu.corpus_chrf(predictions, [references])
    gts = {i: [r] for i, r in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    cider, _ = Cider().compute_score(gts, res)
    exact = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)
    return {"bleu": float(bleu.score), "chrf": float(chrf.score), "cider": float(cider), "exact_match": exact}


def _clean(text: str) -> str:
    from preprocess.config import CaptionConfig
    from preprocess.steps import clean_caption

    return clean_caption(text, CaptionConfig())


def score(
    loaded: Loaded,
    folder: str,
    kind: str,
    *,
    batch_size: int,
    max_caption_tokens: int,
    max_samples: int | None,
    generation: GenerationConfig | None,
    rank: int = 0,
    world: int = 1,
) -> tuple[float, int, list[dict[str, Any]]]:
    """(NLL sum, caption tokens, samples, predictions) over this rank's share; predictions only with
    ``generation``."""
    from infer.caption import caption_features

    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    nll, tokens, count, preds = 0.0, 0, 0, []
    for batch in batches(iter_samples(folder, kind, max_samples, rank, world), batch_size):
        s, n = caption_nll(model, tok, batch, kind, max_caption_tokens, device)
        nll, tokens, count = nll + s, tokens + n, count + len(batch)
        if generation is not None:
            feats = model_input(model, batch, kind, device)
            stamps = [b["meta"].get("timestamps") for b in batch]
            for b, p in zip(batch, caption_features(loaded, feats, generation, stamps), strict=True):
                preds.append(
                    {
                        "key": b["key"],
                        "videoid": b["meta"].get("videoid"),
                        "reference": b["caption"],
                        "prediction": p,
                    }
                )
    return nll, tokens, count, preds


def summarize(nll: float, tokens: int, preds: list[dict[str, Any]], samples: int) -> dict[str, float]:
    if tokens == 0:
        raise ConfigError("shards: no sample with a caption to evaluate")
    loss = nll / tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "samples": samples}
    if preds:
        out.update(caption_metrics([_clean(p["prediction"]) for p in preds], [p["reference"] for p in preds]))
    return out


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
    kind = shard_kind(cfg.shards, cfg.input, resolved.mcfg)
    loaded = load(cfg.model, resolved)
    nll, tokens, count, preds = score(
        loaded,
        cfg.shards,
        kind,
        batch_size=cfg.batch_size,
        max_caption_tokens=cfg.max_caption_tokens,
        max_samples=cfg.max_samples,
        generation=cfg.generation if cfg.metrics else None,
    )
    metrics = summarize(nll, tokens, preds, count)
    if cfg.predictions and preds:
        Path(cfg.predictions).write_text("".join(json.dumps(p) + "\n" for p in preds))
    step = cfg.step if cfg.step is not None else (resolved.step or 0)
    result: dict[str, Any] = {"checkpoint": str(resolved.weights), "step": step, "input": kind, **metrics}
    if cfg.track:
        result["mlflow_run_id"] = _log_to_run(cfg, metrics, step)
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def evaluate_in_training(
    model, tokenizer, vcfg, step: int, rank: int, world: int, run_dir: Path, tracker, device
) -> dict[str, float]:
    """The training job's validation (``eval.*`` keys): called on every rank at ``eval.every`` steps.

    The model is put in eval mode and back; no random number is drawn, so an exactly resumed run stays
    exact. Returns the scores on rank 0 (an empty dict elsewhere).
    """
    from pipeline import distributed

    kind = shard_kind(vcfg.shards, "auto", model.cfg)
    loaded = Loaded(model, tokenizer, device, None)
    gen = GenerationConfig(do_sample=False, max_new_tokens=vcfg.max_new_tokens) if vcfg.metrics else None
    was_training = model.training
    model.eval()
    try:
        nll, tokens, count, preds = score(
            loaded,
            vcfg.shards,
            kind,
            batch_size=vcfg.batch_size,
            max_caption_tokens=vcfg.max_caption_tokens,
            max_samples=vcfg.max_samples,
            generation=gen,
            rank=rank,
            world=world,
        )
    finally:
        model.train(was_training)
    sums = torch.tensor([nll, tokens, count], dtype=torch.float64, device=device)
    distributed.all_reduce_sum(sums)
    if world > 1 and gen is not None:
        preds = [p for part in distributed.all_gather_object(preds) for p in part]
    if rank != 0:
        return {}
    metrics = summarize(float(sums[0]), int(sums[1]), preds, int(sums[2]))
    path = Path(run_dir) / EVAL_FILE
    kept = path.read_text().splitlines() if path.is_file() else []
    kept = [ln for ln in kept if ln and json.loads(ln)["step"] < step]  # a resumed run rewrites later steps
    path.write_text("".join(ln + "\n" for ln in [*kept, json.dumps({"step": step, **metrics})]))
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
    print(f"[train] step {step} eval loss {metrics['loss']:.4f} ppl {metrics['perplexity']:.2f}", flush=True)
    return metrics
