"""Does the model read the video? Per-factor accuracy on grounded held-out clips, with two ablations.

    python cli.py grounded-eval RUN HELDOUT_SHARDS [--output DIR]   # shards with cached features

Greedy stage-1 captions (the same as ``caption-shards RUN SHARDS --greedy``) of every held-out clip are
scored by the colour, shape and direction they name (``pipeline.grounded``), over all clips, the seen
triples and the novel triples never trained on. Then the same clips twice more:

* **shuffled**: each clip gets another held-out clip's features (a seeded derangement). A model that
  reads its video now names the *other* clip's factors, so its accuracy drops to ``chance``: the
  agreement of each reference with the reference whose features it got (what a perfect reader scores).
  A model that ignored the video would keep its accuracy.
* **reversed**: the frames in reverse order. Colour and shape stay; the direction must flip (left <->
  right, up <-> down) for most clips, which only a model reading the frame order can do.

Returns the numbers; with ``--output DIR`` also writes ``grounded_eval.json``, ``grounded_captions.jsonl``
(one line per clip: key, videoid, reference, caption, and the shuffled / reversed captions; usable as
``cli.py report --captions``) and ``grounded_tables.json`` (``cli.py report --accuracy``). The scoring
itself is ``pipeline.grounded`` (``by_combination``, ``accuracy``, ``flipped``, ``derangement``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infer.load import ModelSource, load
from pipeline import grounded
from pipeline.config import ConfigError
from pipeline.evaluation import iter_samples
from pipeline.generate import GenerationConfig, caption_prompt, generate_batched
from pipeline.shards import first_view


@dataclass
class GroundedEvalConfig:
    model: ModelSource = field(default_factory=ModelSource)
    shards: str = ""
    output: str | None = None  # folder for grounded_eval.json and grounded_captions.jsonl
    ablations: bool = True
    seed: int = 0  # of the shuffle
    batch_size: int = 32
    max_new_tokens: int = 20

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("shards: required (held-out shards with cached features)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be >= 1")


@torch.no_grad()
def captions(loaded, features: torch.Tensor, cfg: GroundedEvalConfig) -> list[str]:
    gen = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    prompt = caption_prompt(loaded.tokenizer, loaded.model.cfg.num_video_query_tokens)
    return generate_batched(
        loaded.model, loaded.tokenizer, features.to(loaded.device), [prompt] * len(features), gen
    )


def evaluate(loaded, samples: list[dict[str, Any]], cfg: GroundedEvalConfig) -> tuple[dict, list[dict]]:
    """The report and the per-clip records (reference, caption, and the ablations' captions)."""
    refs = [s["caption"] for s in samples]
    feats = torch.from_numpy(np.stack([first_view(s["features"], "features") for s in samples])).float()
    preds = captions(loaded, feats, cfg)
    report: dict[str, Any] = {"clips": len(samples), "heldout": grounded.by_combination(refs, preds)}
    records = [
        {"key": s["key"], "videoid": s["meta"].get("videoid"), "reference": r, "caption": p}
        for s, r, p in zip(samples, refs, preds, strict=True)
    ]
    if cfg.ablations:
        perm = grounded.derangement(len(samples), cfg.seed)
        shuffled = captions(loaded, feats[perm], cfg)
        reversed_ = captions(loaded, feats.flip(1), cfg)
        report["shuffled"] = {
            **grounded.accuracy(refs, shuffled),
            "chance": grounded.accuracy(refs, [refs[j] for j in perm]),
            "follows_features": grounded.accuracy([refs[j] for j in perm], shuffled)["all"],
        }
        report["reversed"] = {
            "direction_flipped": grounded.flipped(refs, reversed_),
            **{f"{f}_kept": grounded.accuracy(refs, reversed_)[f] for f in ("colour", "shape")},
        }
        for rec, s, r in zip(records, shuffled, reversed_, strict=True):
            rec.update(shuffled=s, reversed=r)
    return report, records


def run(cfg: GroundedEvalConfig) -> dict[str, Any]:
    cfg.validate()
    samples = list(iter_samples(cfg.shards, "features"))
    if not samples:
        raise ConfigError(f"shards: {cfg.shards!r} hold no samples with cached features and a caption")
    loaded = load(cfg.model)
    report, records = evaluate(loaded, samples, cfg)
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "grounded_eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "grounded_captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "grounded_tables.json").write_text(json.dumps(tables(report), indent=2) + "\n")
    return report


def tables(r: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The report as ``cli.py report --accuracy`` tables: {table: {row: {column: fraction}}}."""
    cols = ("colour", "shape", "direction", "all")
    acc = {
        f"{k} triples" if k != "all" else "all clips": {c: a[c] for c in cols}
        for k, a in r["heldout"].items()
        if a["clips"]
    }
    out = {"held-out accuracy": acc}
    if "shuffled" in r:
        out["ablations"] = {
            "features shuffled": {c: r["shuffled"][c] for c in cols},
            "chance (shuffled references)": {c: r["shuffled"]["chance"][c] for c in cols},
            "frames reversed": {
                "direction flipped": r["reversed"]["direction_flipped"],
                "colour kept": r["reversed"]["colour_kept"],
                "shape kept": r["reversed"]["shape_kept"],
            },
        }
    return out


def format_report(r: dict[str, Any]) -> str:
    pct = lambda x: f"{100 * x:5.1f}%"  # noqa: E731
    lines = [f"held-out clips: {r['clips']}          colour  shape   direction  all three"]
    for name, a in r["heldout"].items():
        if a["clips"]:
            lines.append(
                f"  {name + ' triples' if name != 'all' else 'all':<14} ({a['clips']:>3})  {pct(a['colour'])} {pct(a['shape'])}  {pct(a['direction'])}    {pct(a['all'])}"
            )
    if "shuffled" in r:
        s, c = r["shuffled"], r["shuffled"]["chance"]
        lines.append(
            f"  features shuffled     {pct(s['colour'])} {pct(s['shape'])}  {pct(s['direction'])}    {pct(s['all'])}   (chance {pct(c['all'])}; names the other clip's triple: {pct(s['follows_features'])})"
        )
        v = r["reversed"]
        lines.append(
            f"  frames reversed: direction flipped for {pct(v['direction_flipped'])} of clips (colour kept {pct(v['colour_kept'])}, shape kept {pct(v['shape_kept'])})"
        )
    return "\n".join(lines)
