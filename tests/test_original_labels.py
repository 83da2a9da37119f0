"""The original Video-LLaMA's training tokens, pinned token by token (``data.label_mask=original``).

The expected ids and labels below are written out by hand from the original's code (DAMO-NLP-SG/
Video-LLaMA 64888c0: ``video_instruct_dataset.py`` / ``llava_instruct_dataset.py`` ``preprocess`` +
``_mask_targets`` and ``preprocess_for_llama_v2``; ``video_llama.py`` ``prompt_wrap`` + ``forward``),
not computed by pipeline.prompts. The tokenizer is built here to behave like LLaMA's where it matters:
it puts a ``▁`` before the text it is given (sentencepiece's dummy prefix), a space is ``▁``, every
other character is one token, and ``###`` is one token ``▁###`` at the start of a text but ``##`` +
``#`` inside one (as on LLaMA, where this is what makes the original's per-piece counts land on the
turn borders). ``<s>``, ``</s>`` and ``<ImageHere>`` are single tokens. Two placeholders stand for 32.
"""

import string

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.prompts import (
    IGNORE_INDEX,
    caption_sample,
    conversation_sample,
    instruction_prompt,
    prepare_tokenizer,
)

IH = "<ImageHere>"
N = 2  # video placeholders


def build_tokenizer(llama_like: bool) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(set(string.printable) - {" "}) + ["▁"]:
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "#"), ("▁#", "#"), ("▁##", "#"), ("#", "#")] if llama_like else []
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    scheme = "first" if llama_like else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    prepare_tokenizer(hf)
    return hf


@pytest.fixture(scope="module")
def sp():
    return build_tokenizer(llama_like=True)


def t(text: str) -> list[str]:
    """Tokens of text without ``#``: one per character, a space is ``▁``."""
    return ["▁" if c == " " else c for c in text]


def ids_labels(tok, pieces: list[tuple[list[str], bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) from hand-written (tokens, supervised) pieces."""
    ids, labels = [], []
    for tokens, supervised in pieces:
        for token in tokens:
            (i,) = tok.convert_tokens_to_ids([token])
            ids.append(i)
            labels.append(i if supervised else IGNORE_INDEX)
    return ids, labels


def test_the_fixture_tokenizes_like_llama(sp):
    """The properties the hand-written expectations rely on."""
    assert sp.convert_ids_to_tokens(sp("###Human: hi\n", add_special_tokens=False).input_ids) == [
        "▁###",
        *t("Human: hi\n"),
    ]
    assert sp.convert_ids_to_tokens(sp("\n\n###H", add_special_tokens=False).input_ids) == [
        "▁",
        "\n",
        "\n",
        "##",
        "#",
        "H",
    ]
    got = sp.convert_ids_to_tokens(sp("a </s><s>[I", add_special_tokens=False).input_ids)
    assert got == ["▁", "a", "▁", "</s>", "<s>", "[", "I"]  # no dummy prefix after a special token


# ---- Vicuna conversations ------------------------------------------------------------------------------
# The original: header "\n\n" masked (BOS + its 3 tokens); every human turn masked except its first 2
# tokens ("##", "#"); every assistant turn supervised whole ("###Assistant: " + answer + "\n"); the final
# "###" supervised.

HUMAN_HEAD = ["##", "#", *t("Human: ")]
OPENING = [(["<s>", "▁", "\n", "\n"], False), (["##", "#"], True)]  # BOS + header, first human "###"


def test_vicuna_video_two_turns(sp):
    turns = [("Q?", "A."), ("R?", "B.")]
    got = conversation_sample(sp, turns, "vicuna", "video", message="M. ", num_video_tokens=N)
    ids, labels = ids_labels(
        sp,
        [
            *OPENING,
            ([*t("Human: <Video>"), IH, IH, *t("</Video> M. Q?\n")], False),
            (["##", "#", *t("Assistant: A.\n")], True),
            (["##", "#"], True),
            (t("Human: R?\n"), False),
            (["##", "#", *t("Assistant: B.\n")], True),
            (["##", "#"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)
    start = 4 + len(HUMAN_HEAD) + len("<Video>")
    assert got.video_positions == [start, start + 1]


def test_vicuna_llava_image_marker_in_first_turn(sp):
    turns = [("<image>\nQ?", "A.")]
    got = conversation_sample(sp, turns, "vicuna", "image", num_video_tokens=N)
    ids, labels = ids_labels(
        sp,
        [
            *OPENING,
            ([*t("Human: <Image>"), IH, IH, *t("</Image>\nQ?\n")], False),
            (["##", "#", *t("Assistant: A.\n"), "##", "#"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)


def test_image_marker_in_a_later_turn_puts_the_block_there(sp):
    """The original replaces <image> wherever it is (llava_instruct_dataset.preprocess_multimodal)."""
    turns = [("Q?", "A."), ("R? <image>", "B.")]
    got = conversation_sample(sp, turns, "vicuna", "image", num_video_tokens=N)
    ids, labels = ids_labels(
        sp,
        [
            *OPENING,
            (t("Human: Q?\n"), False),
            (["##", "#", *t("Assistant: A.\n"), "##", "#"], True),
            ([*t("Human: R? <Image>"), IH, IH, *t("</Image>\n")], False),
            (["##", "#", *t("Assistant: B.\n"), "##", "#"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)


def test_video_block_always_in_the_first_turn(sp):
    """video_instruct_dataset.preprocess_multimodal prepends the block to the first question; a
    ``<video>`` in a later turn stays text."""
    turns = [("Q?", "A."), ("R <video>", "B.")]
    got = conversation_sample(sp, turns, "vicuna", "video", message="", num_video_tokens=N)
    ids, labels = ids_labels(
        sp,
        [
            *OPENING,
            ([*t("Human: <Video>"), IH, IH, *t("</Video> Q?\n")], False),
            (["##", "#", *t("Assistant: A.\n"), "##", "#"], True),
            (t("Human: R <video>\n"), False),
            (["##", "#", *t("Assistant: B.\n"), "##", "#"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)


def test_vicuna_truncation_at_max_len(sp):
    """``truncation=True, max_length=512`` in the original: ids and labels cut at max_len (BOS counted)."""
    turns = [("Q?", "A.")]
    full_ids, full_labels = ids_labels(
        sp,
        [
            *OPENING,
            ([*t("Human: <Video>"), IH, IH, *t("</Video> Q?\n")], False),
            (["##", "#", *t("Assistant: A.\n"), "##", "#"], True),
        ],
    )
    assert len(full_ids) == 52
    cut = conversation_sample(sp, turns, "vicuna", "video", num_video_tokens=N, max_len=30)
    assert (cut.input_ids, cut.labels) == (full_ids[:30], full_labels[:30])
    # a cut through the video block (at 20, 21): skipped, where the original's forward raised
    assert conversation_sample(sp, turns, "vicuna", "video", num_video_tokens=N, max_len=21) is None
    assert conversation_sample(sp, turns, "vicuna", "video", num_video_tokens=N, max_len=22) is not None


def test_counts_drift_with_a_tokenizer_unlike_llama():
    """The original's piece counts include a BOS per piece; only LLaMA's ``▁###`` merge cancels it. With
    a plain character tokenizer each piece is one token too long, as it would be in the original: here
    the human turn keeps two of its three ``#`` and the assistant header's first ``#`` is masked."""
    tok = build_tokenizer(llama_like=False)
    got = conversation_sample(tok, [("Q?", "A.")], "vicuna", "video", num_video_tokens=N)
    ids, labels = ids_labels(
        tok,
        [
            (["<s>", "\n", "\n"], False),  # BOS + header: 3, the counted length
            (["#", "#"], True),  # the human piece starts here; its first 2 tokens are kept
            (["#", *t("Human: <Video>"), IH, IH, *t("</Video> Q?\n"), "#"], False),  # 32 - 2 masked
            (["#", "#", *t("Assistant: A.\n"), "#", "#", "#"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)


# ---- LLaMA-2 conversations -----------------------------------------------------------------------------
# The original: rounds split at "</s>"; in each, the [INST] ... [/INST] part counted on its own (BOS
# included) minus 2 is masked, so the space token after "[/INST]" stays supervised (on LLaMA it is
# part of the answer's first token); the answer and its "</s>" are supervised.


def test_llama2_video_two_turns(sp):
    turns = [("Q?", "A."), ("R?", "B.")]
    got = conversation_sample(sp, turns, "llama2", "video", message="M. ", num_video_tokens=N)
    system = "[INST] <<SYS>>\n \n<</SYS>>\n\n<Video>"
    ids, labels = ids_labels(
        sp,
        [
            (["<s>", "▁", *t(system), IH, IH, *t("</Video> M. Q? [/INST]")], False),
            ([*t(" A. "), "</s>"], True),
            (["<s>", *t("[INST] R? [/INST]")], False),
            ([*t(" B. "), "</s>"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)


def test_llama2_llava_image(sp):
    turns = [("<image>\nQ?", "A.")]
    got = conversation_sample(sp, turns, "llama2", "image", num_video_tokens=N)
    system = "[INST] <<SYS>>\n \n<</SYS>>\n\n<Image>"
    ids, labels = ids_labels(
        sp,
        [
            (["<s>", "▁", *t(system), IH, IH, *t("</Image>\nQ? [/INST]")], False),
            ([*t(" A. "), "</s>"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)


def test_llama2_truncation_at_max_len(sp):
    turns = [("Q?", "A.")]
    full = conversation_sample(sp, turns, "llama2", "video", num_video_tokens=N)
    # BOS, "▁", "[INST] <<SYS>>\n \n<</SYS>>\n\n<Video>" (34), 2 placeholders, 23 characters, "</s>"
    assert len(full.input_ids) == 1 + 1 + 34 + 2 + len("</Video> Q? [/INST] A. ") + 1 == 62
    assert [i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX] == [57, 58, 59, 60, 61]
    cut = conversation_sample(sp, turns, "llama2", "video", num_video_tokens=N, max_len=60)
    assert cut.input_ids == full.input_ids[:60]
    assert [i for i, lab in enumerate(cut.labels) if lab != IGNORE_INDEX] == [57, 58, 59]  # " ", "A", "."


# ---- cc_sbu_align captions in stage 2: prompt_wrap, not the conversation template --------------------


def test_instruction_prompt_text():
    assert instruction_prompt("vicuna", "image", "Describe.") == (
        "###Human: <Image><ImageHere></Image> Describe. ###Assistant: ",
        "###",
    )
    assert instruction_prompt("llama2", "image", "Describe.") == (
        "[INST] <<SYS>>\n \n<</SYS>>\n\n<Image><ImageHere></Image> Describe. [/INST] ",
        "</s>",
    )


def test_cc_sbu_vicuna_prompt_wrap(sp):
    """[BOS] + tok("###Human: <Image>") + video + tok("</Image> Describe. ###Assistant: ") +
    tok(caption + "###"), each tokenized on its own (so each gets its own dummy prefix)."""
    prompt, end = instruction_prompt("vicuna", "image", "Describe.")
    got = caption_sample(sp, "a dog", num_video_tokens=N, max_caption_tokens=320, end=end, prompt=prompt)
    ids, labels = ids_labels(
        sp,
        [
            (["<s>", "▁###", *t("Human: <Image>"), IH, IH], False),
            ([*t(" </Image> Describe."), "▁###", *t("Assistant: ")], False),
            ([*t(" a dog"), "##", "#"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)
    assert got.video_positions == [16, 17]


def test_cc_sbu_llama2_prompt_wrap(sp):
    """The prompt's trailing space is a token of its own; no space before "</s>"."""
    prompt, end = instruction_prompt("llama2", "image", "Describe.")
    got = caption_sample(sp, "a dog", num_video_tokens=N, max_caption_tokens=320, end=end, prompt=prompt)
    ids, labels = ids_labels(
        sp,
        [
            (["<s>", *t(" [INST] <<SYS>>\n \n<</SYS>>\n\n<Image>"), IH, IH], False),
            (t(" </Image> Describe. [/INST] "), False),
            ([*t(" a dog"), "</s>"], True),
        ],
    )
    assert (got.input_ids, got.labels) == (ids, labels)


def test_cc_sbu_caption_truncation(sp):
    """``max_length=max_txt_len`` cuts caption + end tokens; the end goes first."""
    prompt, end = instruction_prompt("vicuna", "image", "Describe.")
    got = caption_sample(sp, "a dog", num_video_tokens=N, max_caption_tokens=5, end=end, prompt=prompt)
    assert [lab for lab in got.labels if lab != IGNORE_INDEX] == ids_labels(sp, [(t(" a do"), True)])[1]


def test_answers_mask_keeps_the_same_ids(sp):
    """``label_mask=answers``: same tokens, only answers + their end supervised."""
    turns = [("Q?", "A.")]
    original = conversation_sample(sp, turns, "vicuna", "video", num_video_tokens=N)
    answers = conversation_sample(sp, turns, "vicuna", "video", num_video_tokens=N, label_mask="answers")
    assert answers.input_ids == original.input_ids
    supervised = [i for i, lab in enumerate(answers.labels) if lab != IGNORE_INDEX]
    assert sp.convert_ids_to_tokens([answers.input_ids[i] for i in supervised]) == [
        *t("A.\n"),
        "##",
        "#",
    ]


def test_a_drifting_original_mask_is_named(sp):
    """The original's per-piece counts land on the turn borders with a LLaMA-like tokenizer; with the tiny
    BPE tokenizer they drift and drop answer tokens, which training warns about (train/engine.py)."""
    from pipeline.prompts import original_mask_drift
    from pipeline.tiny import tiny_tokenizer

    assert original_mask_drift(sp, "vicuna") is None and original_mask_drift(sp, "llama2") is None
    bpe = tiny_tokenizer()
    prepare_tokenizer(bpe)
    drift = original_mask_drift(bpe, "vicuna")
    assert drift is not None and "2 of 37 answer tokens of a 4-turn vicuna probe go unsupervised" in drift, (
        drift
    )
    turns = [("Describe this video.", "a red square moves left"), ("Which way does it move?", "left"),
             ("What colour is the shape?", "red"), ("What shape is it?", "square")]  # fmt: skip
    original = conversation_sample(bpe, turns, "vicuna", num_video_tokens=N)
    answers = conversation_sample(bpe, turns, "vicuna", num_video_tokens=N, label_mask="answers")
    dropped = [
        i
        for i, lab in enumerate(answers.labels)
        if lab != IGNORE_INDEX and original.labels[i] == IGNORE_INDEX
    ]
    assert len(dropped) == 2  # spelled out again on a sample with 2 placeholders (the probe uses 4)
