"""A tiny LLM that speaks a caption corpus's language and reads its context (``cli.py tiny-llm``).

The real model's LLM (Vicuna, LLaMA-2) knows the language and follows its prompt; it knows nothing of
the video. A random tiny LLM knows neither, so no tiny run could show that information flows from the
pixels into words. This trains, in seconds on a CPU, a small Llama and a byte-level BPE tokenizer on the
captions of a WebVid annotation file, plus the fixed text of the stage-1 prompt and both stage-2
templates (Vicuna ``###Human:``, LLaMA-2 ``[INST]``) with their frame-times message and questions:

    python cli.py tiny-llm --annotations demo_out/grounded/train/annotations --output demo_out/tiny_llm
    python cli.py train --config configs/stage1_tiny.yaml data.shards=S run_dir=R model.llm_path=demo_out/tiny_llm

Why a *prefix*: a language model trained only on captions learns their grammar from the previous word and
ignores anything before the caption; the video tokens could then never steer it. So part of the
sequences carry, where the 32 video tokens go (``[BOS]`` + 32 slots), an informative prefix: the
caption's own tokens in the first slots, ``<unk>`` fillers after (the id the placeholders are looked up
as). Slot k telling the k-th word is the easiest context to learn to read in seconds, and per-slot
content is what the video Q-Former's 32 queries naturally produce. The LLM learns to *read* that
context as a real LLM reads its prompt. Other sequences have an all-filler prefix (the grammar-only
floor, measured the same way), no prefix, or a stage-2 conversation whose video block holds the prefix:
1 to 4 turns, as the corpus's VideoChat conversations ask them (a chat model answers the question of the
turn it is in, the first or a later one). The loss is on the text, never on the prefix slots.

The folder holds ``config.json``, ``model.safetensors`` and the tokenizer: ``AutoModelForCausalLM`` /
``AutoTokenizer`` load it, and ``model.llm_path=DIR`` loads it frozen exactly as it would load Vicuna.
``tiny_llm.json`` beside them records the held-out numbers. Same annotations, steps and seed give the
same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from pipeline import grounded
from pipeline.captions import CaptionCleaning, clean_caption
from pipeline.config import ConfigError, check_writable
from pipeline.model import tiny
from pipeline.prompts import (
    IGNORE_INDEX,
    LLAMA2_SYSTEM,
    frame_times_message,
    render_conversation,
    visual_turn,
)
from pipeline.tiny import tiny_tokenizer

PREFIX_SLOTS = 32  # the stage-1 prompt's video block: [BOS] + 32 video tokens, then the caption
FILLER_ID = 0  # <unk>: what the <ImageHere> placeholders are looked up as before being overwritten
KINDS = ("informative", "filler", "plain", "conversation")
MIX = (0.3, 0.125, 0.125, 0.45)  # share of each kind (with 0.3 conversations it never learned to read
# the colour for "What colour is the shape?": 23 % of held-out answers right, vs 100 % with 0.45)


@dataclass
class TinyLLMConfig:
    annotations: str = ""
    output: str = ""
    steps: int = 800
    seed: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    vocab_size: int = 512
    heldout_fraction: float = 0.1

    def validate(self) -> None:
        if not self.annotations or not self.output:
            raise ConfigError("tiny-llm needs --annotations and --output")
        if self.steps < 1 or self.batch_size < 1 or not 0 < self.heldout_fraction < 1:
            raise ConfigError("tiny-llm: steps and batch_size >= 1, 0 < heldout_fraction < 1")
        if not 0 < self.lr < math.inf:  # nan fails too
            raise ConfigError(f"tiny-llm: lr must be a finite number > 0 (got {self.lr})")


# ---- the corpus -------------------------------------------------------------------------------------


def read_captions(path: str) -> list[dict[str, str]]:
    """Cleaned captions (``caption``) of a WebVid CSV/TSV file or folder, with the grounded factor
    columns when present; refuses a path without any caption."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"annotations: {path!r} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix.lower() in (".csv", ".tsv"))
    rows: list[dict[str, str]] = []
    for f in files:
        try:
            table = pacsv.read_csv(
                f,
                parse_options=pacsv.ParseOptions(delimiter="\t" if f.suffix.lower() == ".tsv" else ","),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True, auto_dict_encode=False),
            )
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(f"annotations: cannot parse {str(f)!r}: {e}") from None
        if "name" not in table.column_names:
            continue
        factors = [c for c in grounded.FACTORS if c in table.column_names]
        for r in table.select(["name", *factors]).to_pylist():
            text = clean_caption(str(r["name"] or ""), CaptionCleaning())
            if text and all(r[c] for c in factors):  # a faulty row without factors is no grounded fact
                rows.append({"caption": text, **{c: str(r[c]) for c in factors}})
    if not rows:
        raise ConfigError(
            f"annotations: {path!r} holds no captions (a WebVid CSV/TSV with a non-empty 'name' column); "
            "tiny-llm learns the language of the captions"
        )
    return rows


def conversation_turns(
    row: dict[str, str], rng: np.random.Generator, kind: str | None = None
) -> list[tuple[str, str]]:
    """Stage-2 turns about one row, as the corpus's VideoChat conversations ask them
    (``grounded.question_answers``): the first 1 to all of the questions the row answers (describe the
    video; for grounded rows each factor too) in a random order; only ``kind``'s question if it is named.
    Later turns matter: stage 2 trains on whole conversations, and an LLM that never saw a second turn
    leaves the video tokens to make up for it (real LLMs are chat models)."""
    if kind is not None:
        kinds = [kind]
    else:
        asked = [k for k in grounded.QUESTIONS if k == "caption" or k in row]
        kinds = [asked[i] for i in rng.permutation(len(asked))][: int(rng.integers(1, len(asked) + 1))]
    return [(grounded.QUESTIONS[k], row["caption"] if k == "caption" else row[k]) for k in kinds]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class SequenceBuilder:
    """Token sequences of the four kinds, with the prefix spliced in where the video tokens go."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def prefix(self, caption: str, informative: bool) -> list[int]:
        """The caption's tokens in order in the first slots, fillers after (all fillers if not informative)."""
        words = self.ids(caption)[:PREFIX_SLOTS] if informative else []
        return words + [FILLER_ID] * (PREFIX_SLOTS - len(words))

    def caption(self, caption: str, prefix: list[int] | None) -> Encoded:
        """``[BOS] prefix caption\\n`` (the stage-1 sample) or, without prefix, ``[BOS] caption\\n``."""
        text = self.ids(caption + "\n")
        head = [self.bos, *(prefix or [])]
        return Encoded(head + text, [IGNORE_INDEX] * len(head) + text)

    def conversation(self, row: dict[str, str], rng: np.random.Generator, kind: str | None = None) -> Encoded:
        """A Vicuna or LLaMA-2 conversation whose ``<Video>`` block holds the informative prefix."""
        template = "vicuna" if rng.random() < 0.5 else "llama2"
        times = np.sort(rng.uniform(0, rng.uniform(5, 20), size=8))
        mark = "\x00"
        turns = conversation_turns(row, rng, kind)
        q, a = turns[0]
        text, _ = render_conversation(
            [
                (visual_turn(q, frame_times_message(times), num_video_tokens=1, placeholder=mark), a),
                *turns[1:],
            ],
            template,
        )
        before, after = text.split(mark)
        head, tail = [self.bos, *self.ids(before)], self.ids(after)
        prefix = self.prefix(row["caption"], True)
        return Encoded(
            head + prefix + tail,
            [IGNORE_INDEX] + head[1:] + [IGNORE_INDEX] * len(prefix) + tail,
        )

    def sample(self, row: dict[str, str], kind: str, rng: np.random.Generator) -> Encoded:
        if kind == "informative":
            return self.caption(row["caption"], self.prefix(row["caption"], True))
        if kind == "filler":
            return self.caption(row["caption"], self.prefix(row["caption"], False))
        if kind == "plain":
            return self.caption(row["caption"], None)
        return self.conversation(row, rng)


def template_text() -> list[str]:
    """The fixed text of both stage-2 templates and the frame-times message, for the tokenizer."""
    turn = [
        (visual_turn(q, frame_times_message([0.0, 1.2, 2.5]), num_video_tokens=0), "yes")
        for q in grounded.QUESTIONS.values()
    ]
    return [render_conversation(turn, t)[0] for t in ("vicuna", "llama2")] + [LLAMA2_SYSTEM]


def batch_tensors(samples: list[Encoded]) -> dict[str, torch.Tensor]:
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), FILLER_ID, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- training and the held-out report ------------------------------------------------------------------


def build_llm(vocab_size: int) -> LlamaForCausalLM:
    """A Llama of the tiny preset's LLM sizes (so ``model_preset: tiny`` + ``llm_path`` fit together)."""
    p = tiny()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.llm_hidden_size,
        intermediate_size=p.llm_intermediate_size,
        num_hidden_layers=p.llm_layers,
        num_attention_heads=p.llm_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, samples: list[Encoded], batch_size: int = 64) -> float:
    """Loss per supervised token over ``samples``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = batch_tensors(samples[i : i + batch_size])
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def lr_at(step: int, cfg: TinyLLMConfig) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup))))


def train_llm(
    model: LlamaForCausalLM, builder: SequenceBuilder, rows, cfg: TinyLLMConfig, rng
) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses = []
    model.train()
    for step in range(cfg.steps):
        kinds = rng.choice(len(KINDS), size=cfg.batch_size, p=MIX)
        picks = rng.integers(len(rows), size=cfg.batch_size)
        batch = batch_tensors(
            [builder.sample(rows[r], KINDS[k], rng) for r, k in zip(picks, kinds, strict=True)]
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def answer_accuracy(model, builder: SequenceBuilder, rows, kind: str, rng) -> float:
    """Share of held-out conversations (informative prefix) whose greedy next-token answer to question
    ``kind`` starts with the right words: the LLM reads the fact it is asked for out of its context."""
    model.eval()
    right = 0
    for row in rows:
        e = builder.conversation(row, rng, kind)
        ids = torch.tensor([e.input_ids])
        answer_at = [i for i, label in enumerate(e.labels) if label != IGNORE_INDEX]
        guess = model(ids).logits[0, [i - 1 for i in answer_at]].argmax(-1)
        text = builder.tok.decode(guess).replace("[/INST]", "###Assistant:").split("###Assistant:")[-1]
        right += text.strip().startswith(grounded.answer(kind, row["colour"], row["shape"], row["direction"]))
    model.train()
    return right / len(rows)


def heldout_report(model, builder: SequenceBuilder, rows, rng) -> dict[str, float]:
    """Held-out caption loss with an informative prefix vs an all-filler one (the grammar-only floor),
    and the perplexity of the plain captions."""
    informative = mean_loss(model, [builder.sample(r, "informative", rng) for r in rows])
    filler = mean_loss(model, [builder.sample(r, "filler", rng) for r in rows])
    plain = mean_loss(model, [builder.sample(r, "plain", rng) for r in rows])
    grounded_rows = [r for r in rows if all(f in r for f in grounded.FACTORS)]
    answers = {
        k: answer_accuracy(model, builder, grounded_rows, k, rng) for k in grounded.QUESTIONS if grounded_rows
    }
    return {
        "answer_accuracy": answers,
        "heldout_captions": len(rows),
        "perplexity": math.exp(plain),
        "loss_plain": plain,
        "loss_filler_prefix": filler,
        "loss_informative_prefix": informative,
    }


def run(cfg: TinyLLMConfig) -> dict:
    """Train and write the LLM folder; returns the held-out report (also in ``tiny_llm.json``)."""
    cfg.validate()
    rows = read_captions(cfg.annotations)
    check_writable(cfg.output)  # one line now, not an OSError after minutes of training
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(rows))
    n_held = max(1, round(cfg.heldout_fraction * len(rows))) if len(rows) > 1 else 0
    held = [rows[i] for i in order[:n_held]] or rows
    train = [rows[i] for i in order[n_held:]] or rows
    corpus = [r["caption"] + "\n" for r in train] + template_text()
    tokenizer = tiny_tokenizer(cfg.vocab_size, corpus)
    builder = SequenceBuilder(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = build_llm(len(tokenizer))
        losses = train_llm(model, builder, train, cfg, rng)
    report = {
        **heldout_report(model, builder, held, np.random.default_rng(cfg.seed + 1)),
        "train_captions": len(train),
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-20:])),
        "config": asdict(cfg),
    }
    out = Path(cfg.output)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_llm.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(r: dict) -> str:
    return (
        f"tiny LLM: {r['train_captions']} training captions, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}\n"
        f"  held-out ({r['heldout_captions']} captions): perplexity {r['perplexity']:.2f}; caption loss "
        f"{r['loss_filler_prefix']:.3f} with an all-filler prefix (grammar only) vs "
        f"{r['loss_informative_prefix']:.3f} with an informative prefix: it reads its context\n"
        + (
            "  held-out questions answered from the prefix: "
            + ", ".join(f"{k} {v:.0%}" for k, v in r["answer_accuracy"].items())
            + "\n"
            if r.get("answer_accuracy")
            else ""
        )
        + f"  written to {r['config']['output']} (model.llm_path=...)"
    )
