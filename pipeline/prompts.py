"""Prompts and labels for both training stages, as in the original Video-LLaMA.

Every sample becomes token ids in which a block of ``<ImageHere>`` placeholders marks where the model
writes its 32 projected video tokens, plus labels that are -100 except on supervised tokens.

* Stage 1 (captions): ``[BOS] <ImageHere>*32 caption + "\\n"``; the caption (with its "\\n") is at most
  32 tokens and is the only supervised part. Same embeddings as the original, which concatenated
  BOS, video and caption embeddings directly.
* Stage 2 (conversations): the whole conversation is rendered to one string and tokenized once; a
  token is supervised when its characters overlap an assistant answer. Vicuna style supervises
  ``{answer}\\n###`` (the ``###`` that follows is the stop signal inference waits for); LLaMA-2 style
  supervises ``{answer} </s>``. The original computed the same masks from per-segment token counts,
  which drift by a token at segment borders; character offsets are exact.

Too-long conversations are truncated on the right unless that would cut the video placeholders or
every supervised token; then the builder returns None so the caller can count the skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

IMAGE_PATCH_TOKEN = "<ImageHere>"
IGNORE_INDEX = -100
VICUNA_HEADER = "\n\n"  # the original's empty system prompt + "\n\n"
LLAMA2_SYSTEM = "<<SYS>>\n \n<</SYS>>\n\n"

Template = Literal["vicuna", "llama2"]
Modality = Literal["video", "image"]


@dataclass
class TextSample:
    input_ids: list[int]
    labels: list[int]
    video_positions: list[int]  # the consecutive <ImageHere> positions the model overwrites


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add ``<ImageHere>`` and set pad = unk, as the original; returns the placeholder id.

    The LLM embedding matrix is deliberately not resized: the placeholder rows are overwritten.
    """
    tokenizer.add_tokens([IMAGE_PATCH_TOKEN], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer from a local directory, prepared for Video-LLaMA prompts."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    return tokenizer


def build_tokenizer(path: str | None) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer from ``path``, or without one (a random LLM, the tiny preset) the tiny
    tokenizer built in code, which is the one such a model trains with."""
    if path:
        return load_tokenizer(path)
    from pipeline.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    return tokenizer


def _image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_PATCH_TOKEN} token; call prepare_tokenizer first")
    return token_id


def caption_sample(
    tokenizer: PreTrainedTokenizerBase,
    caption: str,
    num_video_tokens: int = 32,
    max_caption_tokens: int = 32,
    end: str = "\n",
) -> TextSample:
    """Stage 1: ``[BOS] <ImageHere>*N caption+end``, labels only on the (truncated) caption tokens."""
    text_ids = tokenizer(caption + end, add_special_tokens=False).input_ids[:max_caption_tokens]
    prefix = [tokenizer.bos_token_id] + [_image_token_id(tokenizer)] * num_video_tokens
    return TextSample(
        input_ids=prefix + text_ids,
        labels=[IGNORE_INDEX] * len(prefix) + text_ids,
        video_positions=list(range(1, 1 + num_video_tokens)),
    )


def frame_times_message(seconds: Sequence[float]) -> str:
    """``"The video contains 8 frames sampled at 0.0, 1.2, ... seconds. "`` (original wording)."""
    times = ", ".join(str(round(float(s), 1)) for s in seconds)
    return f"The video contains {len(seconds)} frames sampled at {times} seconds. "


def _visual_block(modality: Modality, num_video_tokens: int) -> str:
    tag = "Video" if modality == "video" else "Image"
    return f"<{tag}>{IMAGE_PATCH_TOKEN * num_video_tokens}</{tag}>"


def _with_visual(turns: Sequence[tuple[str, str]], modality: Modality, block: str, message: str):
    """Put the placeholder block in the first question (LLaVA's ``<image>`` marker, else a prefix)."""
    turns = [(q.replace(IMAGE_PATCH_TOKEN, ""), a.replace(IMAGE_PATCH_TOKEN, "")) for q, a in turns]
    q0, a0 = turns[0]
    if modality == "image" and "<image>" in q0:
        q0 = q0.replace("<image>", block, 1).replace("<image>", "")
    else:
        q0 = f"{block} {message}{q0}"
    return [(q0, a0), *[(q.replace("<image>", ""), a) for q, a in turns[1:]]]


def render_conversation(
    turns: Sequence[tuple[str, str]], template: Template
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt string (without BOS) and the character spans whose tokens are supervised."""
    text, spans = "", []
    if template == "vicuna":
        text = VICUNA_HEADER
        for q, a in turns:
            text += f"###Human: {q}\n###Assistant: "
            spans.append((len(text), len(text) + len(a) + 1 + 3))  # answer, "\n", next "###"
            text += a + "\n"
        return text + "###", spans
    if template == "llama2":
        for i, (q, a) in enumerate(turns):
            text += "[INST] " + (LLAMA2_SYSTEM + q if i == 0 else q) + " [/INST] "
            spans.append((len(text), len(text) + len(a) + len(" </s>")))
            text += a + " </s>" + ("<s>" if i + 1 < len(turns) else "")
        return text, spans
    raise ValueError(f"unknown template {template!r}; use 'vicuna' or 'llama2'")


def _supervised(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    return [any(s < hi and e > lo for lo, hi in spans) and e > s for s, e in offsets]


def conversation_sample(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[tuple[str, str]],
    template: Template = "vicuna",
    modality: Modality = "video",
    message: str = "",
    num_video_tokens: int = 32,
    max_len: int = 512,
) -> TextSample | None:
    """Stage 2: a (question, answer) list -> ids and labels; None when it cannot fit ``max_len``.

    ``message`` is inserted after the video block (``frame_times_message(...)`` for videos).
    Needs a fast tokenizer (character offsets).
    """
    if not turns:
        return None
    if not tokenizer.is_fast:
        raise ValueError("conversation_sample needs a fast tokenizer (return_offsets_mapping)")
    block = _visual_block(modality, num_video_tokens)
    text, spans = render_conversation(_with_visual(turns, modality, block, message), template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id, *enc.input_ids][:max_len]
    mask = [False, *_supervised(enc.offset_mapping, spans)][:max_len]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    image_id = _image_token_id(tokenizer)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != num_video_tokens or not any(mask):
        return None  # truncation cut the video block or left nothing to learn
    return TextSample(input_ids=ids, labels=labels, video_positions=positions)


def collate(samples: Sequence[TextSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on padding) and video_mask."""
    length = max(len(s.input_ids) for s in samples)
    batch = {
        "input_ids": torch.full((len(samples), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(samples), length, dtype=torch.long),
        "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
        "video_mask": torch.zeros(len(samples), length, dtype=torch.bool),
    }
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        batch["input_ids"][row, :n] = torch.tensor(s.input_ids)
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(s.labels)
        batch["video_mask"][row, s.video_positions] = True
    return batch
