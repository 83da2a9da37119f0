"""Held-out scores of a model on a shard set, shared by ``cli.py evaluate`` (infer.evaluate) and the
validation inside training (train.validation):

* loss: the stage-1 training loss (``[BOS] <video> caption\\n``, at most ``max_caption_tokens``) summed
  over every caption token and divided by their number; perplexity = exp(loss);
* metrics: greedy captions scored against the shard's caption: exact match (the fraction of cleaned
  captions equal to the reference), sacrebleu (corpus BLEU-4, chrF) and pycocoevalcap's CIDEr-D (pure
  Python; its Java PTB tokenizer is not used: both sides are cleaned like the training captions, i.e.
  lower-case with punctuation removed). CIDEr needs many clips to mean anything (its IDF comes from
  the references).

What to score is one dataclass, :class:`EvalSettings`; the training run's ``eval:`` section
(train.config.EvalConfig) and ``cli.py evaluate``'s config (infer.evaluate.EvaluateConfig) extend it with
what only they need. Sums come per rank (``rank``/``world`` split the samples) as a :class:`Scores`, so a
distributed caller all-reduces them before :func:`summarize`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline.captions import CaptionCleaning, clean_caption
from pipeline.config import ConfigError
from pipeline.generate import GenerationConfig, caption_features
from pipeline.model import clip_from_frames
from pipeline.prompts import caption_sample, collate
from pipeline.shards import batches, first_view, list_shards, read_shard


@dataclass
class EvalSettings:
    """Which held-out clips to score and how: one definition of these settings and their defaults."""

    shards: str | None = None  # a shard folder (frames or cached features)
    batch_size: int = 8
    max_caption_tokens: int = 32  # as in training: the caption is cut to this many tokens
    max_samples: int | None = None  # the first N clips with a caption (in shard order)
    metrics: bool = False  # also greedy captions scored with exact match / BLEU / chrF / CIDEr (slower)


class Scores(NamedTuple):
    """One rank's sums: summed caption-token NLL, caption tokens, samples, and (with generation) the
    predictions ``{key, videoid, reference, prediction}``."""

    nll: float
    tokens: int
    samples: int
    predictions: list[dict[str, Any]]


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


@torch.no_grad()
def model_input(model, samples: list[dict[str, Any]], kind: str, device: torch.device) -> torch.Tensor:
    """Frozen-encoder features [B,T,Q,D] of frames or cached features (first view when several)."""
    x = np.stack([first_view(s[kind], kind) for s in samples])
    if kind == "features":
        return torch.from_numpy(x).float().to(device)
    return model.encode_frames(clip_from_frames(x).to(device))


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


def score(
    model,
    tokenizer,
    device: torch.device,
    settings: EvalSettings,
    kind: str,
    generation: GenerationConfig | None,
    rank: int = 0,
    world: int = 1,
) -> Scores:
    """This rank's share of ``settings.shards`` scored; predictions only with ``generation``."""
    nll, tokens, count, preds = 0.0, 0, 0, []
    samples = iter_samples(settings.shards, kind, settings.max_samples, rank, world)
    for batch in batches(samples, settings.batch_size):
        s, n = caption_nll(model, tokenizer, batch, kind, settings.max_caption_tokens, device)
        nll, tokens, count = nll + s, tokens + n, count + len(batch)
        if generation is not None:
            feats = model_input(model, batch, kind, device)
            stamps = [b["meta"].get("timestamps") for b in batch]
            captions = caption_features(model, tokenizer, feats, generation, stamps)
            for b, p in zip(batch, captions, strict=True):
                preds.append(
                    {
                        "key": b["key"],
                        "videoid": b["meta"].get("videoid"),
                        "reference": b["caption"],
                        "prediction": p,
                    }
                )
    return Scores(nll, tokens, count, preds)


def summarize(nll: float, tokens: int, preds: list[dict[str, Any]], samples: int) -> dict[str, float]:
    if tokens == 0:
        raise ConfigError("shards: no sample with a caption to evaluate")
    loss = nll / tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "samples": samples}
    if preds:
        clean = CaptionCleaning()
        predictions = [clean_caption(p["prediction"], clean) for p in preds]
        out.update(caption_metrics(predictions, [p["reference"] for p in preds]))
    return out
