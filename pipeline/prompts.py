"""Prompts and labels for both training stages, as in the original Video-LLaMA.

Every sample becomes token ids in which a block of ``<ImageHere>`` placeholders marks where the model
writes its 32 projected video tokens, plus labels that are -100 except on supervised tokens.

* Stage 1 (captions): ``[BOS] <ImageHere>*32 caption + "\\n"``; the caption (with its "\\n") is at most
  32 tokens and is the only supervised part. Same embeddings as the original, which concatenated
  BOS, video and caption embeddings directly.
* Stage 2, caption-only samples (cc_sbu_align): the original's ``prompt_wrap`` form, not the
  conversation template: ``[BOS] {prompt before <ImageHere>} <video> {prompt after} {caption}{end}``
  with prompt ``'###Human: {} ###Assistant: '`` and end ``'###'`` (Vicuna) or
  ``'[INST] <<SYS>>\\n \\n<</SYS>>\\n\\n{} [/INST] '`` and ``'</s>'`` (LLaMA-2). The two prompt pieces and
  the caption are tokenized separately (so a trailing space of the prompt is a token of its own);
  only caption + end are supervised, cut to ``max_caption_tokens``.
* Stage 2 conversations (LLaVA, VideoChat): the whole conversation is rendered and tokenized at once,
  as the original did (``[BOS]`` + the text). Labels by ``label_mask``:

  - ``original`` (default): the original's algorithm, token for token. Vicuna (``_mask_targets``):
    the header and each human turn are masked by the token counts of each piece tokenized on its own
    (``[BOS]`` included), except the first 2 tokens of each human turn (the ``###`` that closes the
    previous answer); assistant turns are supervised whole, ``###Assistant: `` header and trailing
    newline included, and so is the final ``###``. LLaMA-2: rounds split at ``</s>``, the
    ``[INST] ... [/INST]`` part of each round masked by its own token count minus 2. With a LLaMA
    tokenizer the counts land exactly on the turn borders; with another tokenizer they may drift
    as they would in the original.
  - ``answers``: only each answer plus what ends it (``\\n###`` / `` </s>``), found by character
    offsets (needs a fast tokenizer): the cleaner objective this project used before.

Inference uses the same facts: ``stage1_prompt`` (the stage-1 sample without its caption) and
``conversation_prompt`` (a stage-2 template up to the open assistant turn). The visual block
``<Video><ImageHere>*N</Video>`` is built only by ``visual_block`` / ``visual_turn``, and the placeholder id
only by ``image_token_id``, which refuses an unprepared tokenizer.

Too-long conversations are cut at ``max_len`` tokens (BOS included) like the original's
``truncation=True``, unless that would cut the video placeholders or every supervised token; then the
builder returns None so the caller can count the skip (the original would crash or learn nothing).
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
# stage-2 caption samples: (prompt template around "<Image><ImageHere></Image> {instruction}", end)
CAPTION_PROMPTS = {
    "vicuna": ("###Human: {} ###Assistant: ", "###"),
    "llama2": ("[INST] " + LLAMA2_SYSTEM + "{} [/INST] ", "</s>"),
}

Template = Literal["vicuna", "llama2"]
Modality = Literal["video", "image"]
LabelMask = Literal["original", "answers"]
LABEL_MASKS = ("original", "answers")


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


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The ``<ImageHere>`` id; refuses a tokenizer that ``prepare_tokenizer`` has not prepared (its id
    would be ``<unk>`` and the video would overwrite every unknown word)."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_PATCH_TOKEN} token; call prepare_tokenizer first")
    return token_id


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _with_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """What a LLaMA tokenizer's ``tokenizer(text)`` gives: BOS + the text's tokens. Explicit, so a
    tokenizer without a BOS post-processor counts the same."""
    return [tokenizer.bos_token_id, *_tokens(tokenizer, text)]


def caption_sample(
    tokenizer: PreTrainedTokenizerBase,
    caption: str,
    num_video_tokens: int = 32,
    max_caption_tokens: int = 32,
    end: str = "\n",
    prompt: str | None = None,
) -> TextSample:
    """``[BOS] {before} <ImageHere>*N {after} caption+end``, labels only on the (truncated) caption tokens.

    Stage 1 has no prompt. Stage 2 caption samples pass ``instruction_prompt(...)``: the original's
    ``prompt_wrap``, whose text holds one ``<ImageHere>``; each piece is tokenized on its own.
    """
    before, after = prompt.split(IMAGE_PATCH_TOKEN) if prompt else ("", "")
    text_ids = _tokens(tokenizer, caption + end)[:max_caption_tokens]
    prefix = [
        tokenizer.bos_token_id,
        *_tokens(tokenizer, before),
        *[image_token_id(tokenizer)] * num_video_tokens,
        *_tokens(tokenizer, after),
    ]
    start = 1 + len(_tokens(tokenizer, before))
    return TextSample(
        input_ids=prefix + text_ids,
        labels=[IGNORE_INDEX] * len(prefix) + text_ids,
        video_positions=list(range(start, start + num_video_tokens)),
    )


def instruction_prompt(template: Template, modality: Modality, instruction: str) -> tuple[str, str]:
    """(prompt, end) of a stage-2 caption sample: the original's ``prompt_template`` around a line of
    its ``prompts/alignment_image.txt`` (``<Image><ImageHere></Image> {instruction}``)."""
    wrap, end = CAPTION_PROMPTS[template]
    return wrap.replace("{}", visual_turn(instruction, modality=modality, num_video_tokens=1)), end


def visual_block(
    modality: Modality = "video", num_video_tokens: int = 32, placeholder: str = IMAGE_PATCH_TOKEN
) -> str:
    """``<Video><ImageHere>*N</Video>`` (``<Image>`` for images): where the projected video tokens go."""
    tag = "Video" if modality == "video" else "Image"
    return f"<{tag}>{placeholder * num_video_tokens}</{tag}>"


def visual_turn(
    question: str,
    message: str = "",
    modality: Modality = "video",
    num_video_tokens: int = 32,
    placeholder: str = IMAGE_PATCH_TOKEN,
) -> str:
    """The first question with the visual block before it: ``<Video>...</Video> {message}{question}``."""
    return f"{visual_block(modality, num_video_tokens, placeholder)} {message}{question}"


def stage1_prompt(tokenizer: PreTrainedTokenizerBase, num_video_tokens: int = 32) -> TextSample:
    """Inference with the stage-1 form: ``[BOS] <ImageHere>*N`` (the training sample without its caption)."""
    ids = [tokenizer.bos_token_id] + [image_token_id(tokenizer)] * num_video_tokens
    return TextSample(ids, [], list(range(1, 1 + num_video_tokens)))


def conversation_prompt(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[tuple[str, str]],
    question: str,
    template: Template,
    message: str = "",
    num_video_tokens: int = 32,
) -> TextSample:
    """Inference with a stage-2 template: earlier turns + the new question, ending where the assistant's
    answer starts (``...###Assistant:`` / ``...[/INST]``, as the original's ``Conversation.get_prompt()``)."""
    turns = [*history, (question, "")]
    turns[0] = (
        visual_turn(turns[0][0].replace(IMAGE_PATCH_TOKEN, ""), message, "video", num_video_tokens),
        turns[0][1],
    )
    text, spans = render_conversation(turns, template)
    start = spans[-1][0]
    text = text[: start - 1] if text[start - 1] == " " else text[:start]
    ids = _with_bos(tokenizer, text)
    image_id = image_token_id(tokenizer)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != num_video_tokens:
        raise ValueError(f"the prompt holds {len(positions)} video placeholders, expected {num_video_tokens}")
    return TextSample(ids, [], positions)


def frame_times_message(seconds: Sequence[float]) -> str:
    """``"The video contains 8 frames sampled at 0.0, 1.2, ... seconds. "`` (original wording)."""
    times = ", ".join(str(round(float(s), 1)) for s in seconds)
    return f"The video contains {len(seconds)} frames sampled at {times} seconds. "


def _with_visual(turns: Sequence[tuple[str, str]], modality: Modality, num_video_tokens: int, message: str):
    """Put the placeholder block where the original does.

    Videos: before the first question, with the frame-timestamp message. Images: at LLaVA's
    ``<image>`` marker, in whichever turn it is; a second marker is dropped (the original would put
    a second block there and crash on the count), no marker at all puts the block before the first
    question. ``<ImageHere>`` text in the data is removed so it cannot break the count.
    """
    turns = [(q.replace(IMAGE_PATCH_TOKEN, ""), a.replace(IMAGE_PATCH_TOKEN, "")) for q, a in turns]
    texts = [t for pair in turns for t in pair]
    marked = next((i for i, t in enumerate(texts) if "<image>" in t), None) if modality == "image" else None
    if marked is None:
        texts[0] = visual_turn(texts[0], message, modality, num_video_tokens)
    else:
        texts = [t if i == marked else t.replace("<image>", "") for i, t in enumerate(texts)]
        head, _, tail = texts[marked].partition("<image>")
        texts[marked] = head + visual_block(modality, num_video_tokens) + tail.replace("<image>", "")
    return list(zip(texts[0::2], texts[1::2], strict=True))


def render_conversation(
    turns: Sequence[tuple[str, str]], template: Template
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt string (without BOS) and the character spans of the answers (``answers`` labels)."""
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


def _ignore(labels: list[int], lo: int, hi: int) -> None:
    for i in range(max(lo, 0), min(hi, len(labels))):
        labels[i] = IGNORE_INDEX


def _vicuna_original_labels(tokenizer, ids: list[int], turns: Sequence[tuple[str, str]]) -> list[int]:
    """The original's ``_mask_targets``: piece lengths from tokenizing each piece on its own."""
    labels = list(ids)
    cur = len(_with_bos(tokenizer, VICUNA_HEADER))
    _ignore(labels, 0, cur)
    for q, a in turns:
        human = len(_with_bos(tokenizer, f"###Human: {q}\n"))
        _ignore(labels, cur + 2, cur + human)  # its first 2 tokens stay supervised
        cur += human + len(_with_bos(tokenizer, f"###Assistant: {a}\n"))
    return labels


def _llama2_original_labels(tokenizer, ids: list[int], text: str) -> list[int]:
    """The original's ``preprocess_for_llama_v2``: per ``</s>`` round, mask ``[INST] ... [/INST]``."""
    labels, cur = list(ids), 1
    _ignore(labels, 0, cur)
    for part in text.split("</s>"):
        pieces = part.split("[/INST] ")
        if not part or len(pieces) != 2:
            break
        instruction = len(_with_bos(tokenizer, pieces[0] + "[/INST] ")) - 2
        _ignore(labels, cur, cur + instruction)
        cur += len(_with_bos(tokenizer, part))
    _ignore(labels, cur, len(labels))
    return labels


def _answer_labels(tokenizer, ids: list[int], text: str, spans: list[tuple[int, int]]) -> list[int]:
    """``answers``: a token is supervised when its characters overlap an answer span."""
    if not tokenizer.is_fast:
        raise ValueError("data.label_mask=answers needs a fast tokenizer (return_offsets_mapping)")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    keep = [False] + [any(s < hi and e > lo for lo, hi in spans) and e > s for s, e in offsets]
    return [t if k else IGNORE_INDEX for t, k in zip(ids, keep, strict=True)]


def conversation_sample(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[tuple[str, str]],
    template: Template = "vicuna",
    modality: Modality = "video",
    message: str = "",
    num_video_tokens: int = 32,
    max_len: int = 512,
    label_mask: LabelMask = "original",
) -> TextSample | None:
    """Stage 2: a (question, answer) list -> ids and labels; None when it cannot fit ``max_len``.

    ``message`` is inserted after the video block (``frame_times_message(...)`` for videos).
    """
    if not turns:
        return None
    if label_mask not in LABEL_MASKS:
        raise ValueError(f"label_mask must be one of {LABEL_MASKS}, not {label_mask!r}")
    turns = _with_visual(turns, modality, num_video_tokens, message)
    text, spans = render_conversation(turns, template)
    ids = _with_bos(tokenizer, text)
    if label_mask == "answers":
        labels = _answer_labels(tokenizer, ids, text, spans)
    elif template == "vicuna":
        labels = _vicuna_original_labels(tokenizer, ids, turns)
    else:
        labels = _llama2_original_labels(tokenizer, ids, text)
    ids, labels = ids[:max_len], labels[:max_len]
    image_id = image_token_id(tokenizer)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != num_video_tokens or all(lab == IGNORE_INDEX for lab in labels):
        return None  # truncation cut the video block or left nothing to learn
    return TextSample(input_ids=ids, labels=labels, video_positions=positions)


def original_mask_drift(tokenizer: PreTrainedTokenizerBase, template: Template) -> str | None:
    """Whether ``label_mask=original`` leaves answer tokens unsupervised with this tokenizer: the original
    counts each piece's tokens on its own, which lands on the turn borders with LLaMA's tokenizer but can
    drift with another, silently dropping later turns' answers. A message, or None when the masks agree
    on the answers (or the tokenizer is not fast, so the answers cannot be located)."""
    if not tokenizer.is_fast:
        return None
    turns = [("Describe this video.", "a red square moves left"), ("Which way does it move?", "left"),
             ("What colour is the shape?", "red"), ("What shape is it?", "square")]  # fmt: skip
    both = [
        conversation_sample(tokenizer, turns, template, num_video_tokens=4, label_mask=m) for m in LABEL_MASKS
    ]
    original, answers = (s.labels for s in both)
    wanted = [i for i, lab in enumerate(answers) if lab != IGNORE_INDEX]
    missed = sum(original[i] == IGNORE_INDEX for i in wanted)
    if not missed:
        return None
    return (
        f"data.label_mask=original: with this tokenizer the original's per-piece token counts drift off "
        f"the turn borders ({missed} of {len(wanted)} answer tokens of a 4-turn {template} probe go "
        f"unsupervised); data.label_mask=answers supervises exactly the answers"
    )


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
