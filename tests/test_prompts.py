"""Prompt and label building, checked token by token: ``label_mask=answers`` and the shared pieces
(the original's masks, the default, are pinned in tests/test_original_labels.py).

Most tests use a character-level tokenizer (every ASCII character is one token, ``<s>``, ``</s>`` and
``<ImageHere>`` are single tokens), so the expected ids and label mask are written here directly from
the template text, independently of the span logic in pipeline.prompts.
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.prompts import (
    IGNORE_INDEX,
    IMAGE_PATCH_TOKEN,
    caption_sample,
    collate,
    conversation_sample,
    frame_times_message,
    image_token_id,
    prepare_tokenizer,
    stage1_prompt,
    visual_block,
    visual_turn,
)
from pipeline.tiny import tiny_tokenizer

IMG = IMAGE_PATCH_TOKEN * 32


@pytest.fixture(scope="module")
def char_tok():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])  # matched as whole tokens inside text
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    prepare_tokenizer(hf)
    return hf


def expected(tok, segments):
    """(ids, labels) for BOS + segments of (text, supervised), one token per char or special token."""
    specials = {
        "<s>": tok.bos_token_id,
        "</s>": tok.eos_token_id,
        IMAGE_PATCH_TOKEN: tok.convert_tokens_to_ids(IMAGE_PATCH_TOKEN),
    }
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for text, supervised in segments:
        i = 0
        while i < len(text):
            special = next((s for s in specials if text.startswith(s, i)), None)
            piece = special or text[i]
            tid = (
                specials[special]
                if special
                else tok.convert_tokens_to_ids(
                    tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(piece)[0][0]
                )
            )
            ids.append(tid)
            labels.append(tid if supervised else IGNORE_INDEX)
            i += len(piece)
    return ids, labels


def test_char_tokenizer_is_one_token_per_char(char_tok):
    text = "###Human: a b\n" + IMG + "</s><s>"
    ids = char_tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len("###Human: a b\n") + 32 + 2
    assert ids[-2:] == [2, 1]
    assert char_tok.pad_token_id == 0 == char_tok.unk_token_id


def test_vicuna_video_labels_token_by_token(char_tok):
    msg = frame_times_message([0.0, 1.2, 2.4])
    turns = [("What is it?", "A dog."), ("Color?", "Brown.")]
    sample = conversation_sample(
        char_tok, turns, template="vicuna", modality="video", message=msg, label_mask="answers"
    )
    ids, labels = expected(
        char_tok,
        [
            ("\n\n###Human: <Video>" + IMG + "</Video> " + msg + "What is it?\n###Assistant: ", False),
            ("A dog.\n###", True),
            ("Human: Color?\n###Assistant: ", False),
            ("Brown.\n###", True),
        ],
    )
    assert sample.input_ids == ids
    assert sample.labels == labels
    start = len("\n\n###Human: <Video>") + 1  # +1 for BOS
    assert sample.video_positions == list(range(start, start + 32))


def test_llama2_video_labels_token_by_token(char_tok):
    turns = [("What is it?", "A dog."), ("Color?", "Brown.")]
    sample = conversation_sample(
        char_tok, turns, template="llama2", modality="video", message="M. ", label_mask="answers"
    )
    ids, labels = expected(
        char_tok,
        [
            ("[INST] <<SYS>>\n \n<</SYS>>\n\n<Video>" + IMG + "</Video> M. What is it? [/INST] ", False),
            ("A dog. </s>", True),
            ("<s>[INST] Color? [/INST] ", False),
            ("Brown. </s>", True),
        ],
    )
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert sum(lab == char_tok.eos_token_id for lab in sample.labels) == 2  # each answer learns to stop


def test_image_marker_is_replaced(char_tok):
    turns = [("<image>\nWhat is shown?", "A cat.")]
    sample = conversation_sample(char_tok, turns, template="vicuna", modality="image", label_mask="answers")
    ids, labels = expected(
        char_tok,
        [
            ("\n\n###Human: <Image>" + IMG + "</Image>\nWhat is shown?\n###Assistant: ", False),
            ("A cat.\n###", True),
        ],
    )
    assert (sample.input_ids, sample.labels) == (ids, labels)


def test_truncation_keeps_video_or_skips(char_tok):
    turns = [("Q?", "First answer."), ("Again?", "Second answer that is long.")]
    full = conversation_sample(char_tok, turns, template="vicuna", label_mask="answers", max_len=10_000)
    assert len(full.input_ids) > 100
    cut = conversation_sample(
        char_tok, turns, template="vicuna", label_mask="answers", max_len=len(full.input_ids) - 5
    )
    assert cut.input_ids == full.input_ids[:-5] and cut.labels == full.labels[:-5]
    assert (
        conversation_sample(char_tok, turns, template="vicuna", label_mask="answers", max_len=30) is None
    )  # video block cut
    prompt_only = len("\n\n###Human: <Video>") + 1 + 32 + len("</Video> Q?\n###Assistant: ")
    assert (
        conversation_sample(char_tok, turns, template="vicuna", label_mask="answers", max_len=prompt_only)
        is None
    )
    assert (
        conversation_sample(char_tok, turns, template="vicuna", label_mask="answers", max_len=prompt_only + 1)
        is not None
    )


def test_placeholder_text_in_data_cannot_break_the_count(char_tok):
    turns = [("say " + IMAGE_PATCH_TOKEN, "ok " + IMAGE_PATCH_TOKEN)]
    sample = conversation_sample(char_tok, turns, template="llama2")
    assert len(sample.video_positions) == 32


def test_caption_sample(char_tok):
    sample = caption_sample(char_tok, "a dog", num_video_tokens=32, max_caption_tokens=32)
    ids, labels = expected(char_tok, [(IMG, False), ("a dog\n", True)])
    assert (sample.input_ids, sample.labels) == (ids, labels)
    assert sample.video_positions == list(range(1, 33))
    long = caption_sample(char_tok, "x" * 100, max_caption_tokens=32)
    assert len(long.input_ids) == 1 + 32 + 32
    assert sum(lab != IGNORE_INDEX for lab in long.labels) == 32  # truncated, "\n" cut off as in the original


def test_bpe_tokenizer_supervises_whole_answers():
    """With merged tokens (" a", "###"), the supervised tokens decode to exactly the answers."""
    tok = tiny_tokenizer()
    image_id = prepare_tokenizer(tok)
    turns = [("What is happening in this video?", "a woman is cooking pasta in a kitchen.")]
    for template, answer in (
        ("vicuna", " a woman is cooking pasta in a kitchen.\n###"),
        ("llama2", " a woman is cooking pasta in a kitchen. </s>"),
    ):
        s = conversation_sample(tok, turns, template=template, label_mask="answers")
        supervised = [t for t in s.labels if t != IGNORE_INDEX]
        assert tok.decode(supervised) in (answer, answer.lstrip())
        assert [s.input_ids[p] for p in s.video_positions] == [image_id] * 32


def test_frame_times_message():
    assert (
        frame_times_message([0.0, 1.2, 2.4])
        == "The video contains 3 frames sampled at 0.0, 1.2, 2.4 seconds. "
    )
    assert frame_times_message([0, 3]) == "The video contains 2 frames sampled at 0.0, 3.0 seconds. "


def test_collate_pads_right(char_tok):
    a = caption_sample(char_tok, "ab")
    b = conversation_sample(char_tok, [("q", "r")], template="vicuna")
    batch = collate([a, b], pad_id=char_tok.pad_token_id)
    n_a, n_b = len(a.input_ids), len(b.input_ids)
    assert batch["input_ids"].shape == (2, n_b)
    assert batch["attention_mask"].sum(1).tolist() == [n_a, n_b]
    assert batch["input_ids"][0, n_a:].eq(0).all() and batch["labels"][0, n_a:].eq(IGNORE_INDEX).all()
    assert batch["video_mask"].sum(1).tolist() == [32, 32]
    assert torch.equal(batch["video_mask"][1].nonzero().squeeze(1), torch.tensor(b.video_positions))
    assert batch["labels"][1].tolist() == b.labels


def test_visual_block_and_checked_placeholder_id(char_tok):
    """The one place the visual block and the placeholder id are made; an unprepared tokenizer is
    refused (its <ImageHere> would be <unk>, and the video would overwrite every unknown word)."""
    assert visual_block("video", 2) == "<Video><ImageHere><ImageHere></Video>"
    assert visual_block("image", 0) == "<Image></Image>"
    assert visual_turn("Q?", "M. ", num_video_tokens=1, placeholder="#") == "<Video>#</Video> M. Q?"
    image_id = image_token_id(char_tok)
    assert image_id == char_tok.convert_tokens_to_ids(IMAGE_PATCH_TOKEN) and image_id != char_tok.unk_token_id
    p = stage1_prompt(char_tok, 3)
    assert (p.input_ids, p.video_positions) == (
        [char_tok.bos_token_id, image_id, image_id, image_id],
        [1, 2, 3],
    )
    raw = tiny_tokenizer()
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        image_token_id(raw)
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        stage1_prompt(raw, 3)
