"""Validation inside training (``eval.shards=VAL eval.every=N``): held-out caption loss and perplexity
(and with ``eval.metrics`` greedy-caption BLEU / chrF / CIDEr), scored by pipeline.evaluation like
``cli.py evaluate``; every rank scores its share, the sums are all-reduced, rank 0 writes and logs."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import distributed
from pipeline.evaluation import score, summarize
from pipeline.generate import GenerationConfig
from pipeline.rundir import EVAL
from pipeline.shards import inspect_shards
from train.config import EvalConfig


def evaluate_in_training(
    model, tokenizer, vcfg: EvalConfig, step: int, rank: int, world: int, run_dir: Path, tracker, device
) -> dict[str, float]:
    """Called on every rank at ``eval.every`` steps. The model is put in eval mode and back; no random
    number is drawn, so an exactly resumed run stays exact. Returns the scores on rank 0 (an empty dict
    elsewhere)."""
    kind = inspect_shards(vcfg.shards, mcfg=model.cfg, setting="eval.shards").kind
    gen = GenerationConfig(do_sample=False, max_new_tokens=vcfg.max_new_tokens) if vcfg.metrics else None
    was_training = model.training
    model.eval()
    try:
        scores = score(model, tokenizer, device, vcfg, kind, gen, rank=rank, world=world)
    finally:
        model.train(was_training)
    sums = distributed.all_reduce_named(
        {"nll": scores.nll, "tokens": scores.tokens, "samples": scores.samples}, device
    )
    preds = scores.predictions
    if world > 1 and gen is not None:
        preds = [p for part in distributed.all_gather_object(preds) for p in part]
    if rank != 0:
        return {}
    metrics = summarize(sums["nll"], int(sums["tokens"]), preds, int(sums["samples"]))
    path = Path(run_dir) / EVAL
    kept = path.read_text().splitlines() if path.is_file() else []
    kept = [ln for ln in kept if ln and json.loads(ln)["step"] < step]  # a resumed run rewrites later steps
    path.write_text("".join(ln + "\n" for ln in [*kept, json.dumps({"step": step, **metrics})]))
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
    print(f"[train] step {step} eval loss {metrics['loss']:.4f} ppl {metrics['perplexity']:.2f}", flush=True)
    return metrics
