"""Does the model read the video? Per-factor accuracy on grounded held-out clips, with two ablations.

    python cli.py grounded-eval RUN HELDOUT_SHARDS [--output DIR] [--probe TRAIN_SHARDS]  # cached features

Greedy stage-1 captions (the same as ``caption-shards RUN SHARDS --greedy``) of every held-out clip are
scored by the colour, shape and direction they name (``pipeline.grounded``), over all clips, the seen
triples and the novel triples never trained on. Then the same clips twice more:

* **shuffled**: each clip gets another held-out clip's features (a seeded derangement). A model that
  reads its video now names the *other* clip's factors, so its accuracy drops to ``chance``: the
  agreement of each reference with the reference whose features it got (what a perfect reader scores).
  A model that ignored the video would keep its accuracy.
* **reversed**: the frames in reverse order. Colour and shape stay; the direction must flip (left <->
  right, up <-> down) for most clips, which only a model reading the frame order can do.

With ``--probe TRAIN_SHARDS``, linear probes per factor fitted on the training clips' cached features and
scored on the held-out ones (``infer.probe``) are printed beside the model: "the encoder carries X,
training reached Y".

Returns the numbers; with ``--output DIR`` also writes ``grounded_eval.json``, ``grounded_captions.jsonl``
(one line per clip: key, videoid, reference, caption, and the shuffled / reversed captions; usable as
``cli.py report --captions``) and ``grounded_tables.json`` (``cli.py report --accuracy``). The scoring
itself is ``pipeline.grounded`` (``by_combination``, ``accuracy``, ``flipped``, ``derangement``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from infer.load import ModelSource, load
from infer.probe import probe_factors
from pipeline import grounded
from pipeline.config import ConfigError, check_writable
from pipeline.evaluation import iter_samples
from pipeline.generate import GenerationConfig, PromptSpec, generate_batched
from pipeline.prompts import stage1_prompt
from pipeline.shards import first_view

EVAL_FILES = ("grounded_eval.json", "grounded_captions.jsonl", "grounded_tables.json")
QA_FILES = ("grounded_qa.json", "grounded_answers.jsonl", "grounded_qa_tables.json")  # --questions


@dataclass
class GroundedEvalConfig:
    model: ModelSource = field(default_factory=ModelSource)
    shards: str = ""
    output: str | None = None  # folder for grounded_eval.json and grounded_captions.jsonl
    ablations: bool = True
    seed: int = 0  # of the shuffle
    batch_size: int = 32
    max_new_tokens: int = 20
    # stage 2: ask every question of pipeline.grounded.QUESTIONS in this template instead of captioning
    questions: Literal["vicuna", "llama2"] | None = None
    # training shards with cached features: fit linear probes per factor on them, score on ``shards``
    # (infer.probe): what the encoder carries, printed beside what training reached
    probe: str | None = None

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("shards: required (held-out shards with cached features)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be >= 1")


@torch.no_grad()
def captions(loaded, features: torch.Tensor, cfg: GroundedEvalConfig) -> list[str]:
    gen = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    prompt = stage1_prompt(loaded.tokenizer, loaded.model.cfg.num_video_query_tokens)
    return generate_batched(
        loaded.model, loaded.tokenizer, features.to(loaded.device), [prompt] * len(features), gen
    )


def evaluate(loaded, samples: list[dict[str, Any]], cfg: GroundedEvalConfig) -> tuple[dict, list[dict]]:
    """The report and the per-clip records (reference, caption, and the ablations' captions)."""
    refs = [s["caption"] for s in samples]
    feats = _features(samples)
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


@torch.no_grad()
def answers(
    loaded, features: torch.Tensor, stamps: list, question: str, cfg: GroundedEvalConfig
) -> list[str]:
    """Greedy answers to one question about each clip, asked first in a fresh conversation (as ``chat``)."""
    gen = GenerationConfig(
        template=cfg.questions, do_sample=False, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    spec = PromptSpec(cfg.questions, question)
    n = loaded.model.cfg.num_video_query_tokens
    prompts = [spec.build(loaded.tokenizer, n, t) for t in stamps]
    return generate_batched(loaded.model, loaded.tokenizer, features.to(loaded.device), prompts, gen)


def answer_accuracy(kind: str, references: list[str], predictions: list[str]) -> float:
    """A factor question is answered right when the answer names the clip's value of that factor; the
    describe question ("caption") when it names all three."""
    return grounded.accuracy(references, predictions)["all" if kind == "caption" else kind]


def evaluate_questions(loaded, samples: list[dict[str, Any]], cfg: GroundedEvalConfig) -> tuple[dict, list]:
    """Stage 2: accuracy per question kind over all / seen / novel clips, and with shuffled features."""
    refs = [s["caption"] for s in samples]
    feats = _features(samples)
    stamps = [s["meta"].get("timestamps") for s in samples]
    perm = grounded.derangement(len(samples), cfg.seed)
    novel = [grounded.is_novel(r) for r in refs]
    report: dict[str, Any] = {"clips": len(samples), "template": cfg.questions, "questions": {}}
    records = [{"key": s["key"], "reference": r} for s, r in zip(samples, refs, strict=True)]
    for kind, question in grounded.QUESTIONS.items():
        got = answers(loaded, feats, stamps, question, cfg)
        acc = {"all": answer_accuracy(kind, refs, got)}
        for name, keep in (("seen", False), ("novel", True)):
            idx = [i for i, v in enumerate(novel) if v == keep]
            acc[name] = answer_accuracy(kind, [refs[i] for i in idx], [got[i] for i in idx]) if idx else None
        if cfg.ablations:
            shuffled = answers(loaded, feats[perm], [stamps[j] for j in perm], question, cfg)
            acc["shuffled"] = answer_accuracy(kind, refs, shuffled)
            acc["shuffled_chance"] = answer_accuracy(kind, refs, [refs[j] for j in perm])
        report["questions"][kind] = {"question": question, **acc}
        for rec, a in zip(records, got, strict=True):
            rec[kind] = a
    return report, records


def refs_of(samples: list[dict[str, Any]]) -> list[str]:
    """The reference captions (the factors' source for scoring and for the probe's labels)."""
    return [s["caption"] for s in samples]


def _features(samples: list[dict[str, Any]]) -> torch.Tensor:
    return torch.from_numpy(np.stack([first_view(s["features"], "features") for s in samples])).float()


def check_references(samples: list[dict[str, Any]], shards: str) -> None:
    """Refuse shards whose captions are not grounded ones: their factors cannot be scored."""
    bad = [s["caption"] for s in samples if not grounded.is_grounded(s["caption"])]
    if bad:
        raise ConfigError(
            f"shards: {len(bad)} of {len(samples)} references in {shards!r} are not grounded captions "
            f"(e.g. {bad[0][:80]!r}; expected like {grounded.caption('red', 'square', 'left')!r}): "
            "grounded-eval scores clips of make-sample --grounded"
        )


def run(cfg: GroundedEvalConfig) -> dict[str, Any]:
    cfg.validate()
    if cfg.output:
        check_writable(cfg.output)  # one line now, not an OSError after every caption is generated
    samples = list(iter_samples(cfg.shards, "features"))
    if not samples:
        raise ConfigError(f"shards: {cfg.shards!r} hold no samples with cached features and a caption")
    check_references(samples, cfg.shards)
    loaded = load(cfg.model)
    report, records = (evaluate_questions if cfg.questions else evaluate)(loaded, samples, cfg)
    if cfg.probe:
        train = list(iter_samples(cfg.probe, "features"))
        if not train:
            raise ConfigError(f"probe: {cfg.probe!r} holds no samples with cached features and a caption")
        report["probe"] = probe_factors(
            _features(train).numpy(), refs_of(train), _features(samples).numpy(), refs_of(samples)
        )
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        names = QA_FILES if cfg.questions else EVAL_FILES
        (out / names[0]).write_text(json.dumps(report, indent=2) + "\n")
        (out / names[1]).write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / names[2]).write_text(json.dumps(tables(report), indent=2) + "\n")
    return report


def tables(r: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The report as ``cli.py report --accuracy`` tables: {table: {row: {column: fraction}}}."""
    if "questions" in r:
        return {f"stage 2 answers ({r['template']})": question_rows(r)}
    cols = ("colour", "shape", "direction", "all")
    acc = {
        f"{k} triples" if k != "all" else "all clips": {c: a[c] for c in cols}
        for k, a in r["heldout"].items()
        if a["clips"]
    }
    if "probe" in r:
        acc["linear probe on the cached features"] = {c: r["probe"][c] for c in cols}
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


def question_rows(r: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per question: held-out accuracy (all, seen, novel triples), and with shuffled features vs chance."""
    names = {"all": "all clips", "seen": "seen triples", "novel": "novel triples"}
    names.update(shuffled="features shuffled", shuffled_chance="chance (shuffled)")
    return {
        a["question"]: {name: a[k] for k, name in names.items() if a.get(k) is not None}
        for a in r["questions"].values()
    }


def format_questions(r: dict[str, Any]) -> str:
    """One line per question: held-out answer accuracy (all / seen / novel) and with shuffled features."""
    pct = lambda x: "  -  " if x is None else f"{100 * x:5.1f}%"  # noqa: E731
    head = f"stage 2 ({r['template']}), {r['clips']} held-out clips, answer accuracy:"
    lines = [f"{head:<58}all   seen  novel  features shuffled"]
    for a in r["questions"].values():
        shuffled = f"  {pct(a['shuffled'])} (chance {pct(a['shuffled_chance'])})" if "shuffled" in a else ""
        lines.append(f"  {a['question']:<52} {pct(a['all'])} {pct(a['seen'])} {pct(a['novel'])}{shuffled}")
    return "\n".join(lines)


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
    if "probe" in r:
        lines.append(probe_line(r))
    return "\n".join(lines)


def probe_line(r: dict[str, Any]) -> str:
    """ "the encoder carries X, training reached Y": probe vs model accuracy per factor, and the gap."""
    p, a = r["probe"], r["heldout"]["all"]
    cols = ("colour", "shape", "direction", "all")
    carries = ", ".join(f"{c} {100 * p[c]:.1f}%" for c in cols)
    reached = ", ".join(f"{c} {100 * a[c]:.1f}%" for c in cols)
    gaps = ", ".join(f"{c} {100 * (p[c] - a[c]):+.1f}" for c in cols)
    return (
        f"  linear probes ({p['train_clips']} training clips -> {p['clips']} held-out): the encoder carries "
        f"{carries};\n  training reached {reached} (probe minus model, points: {gaps})"
    )
