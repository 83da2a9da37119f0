"""The tiny preset's tokenizer, built in code: a random tiny LLM (``model.llm_path`` unset) trains and
captions with it, with no download.

The tokenizer mimics the LLaMA conventions the prompts rely on: ``<unk>``=0 (also the pad),
``<s>``=1, ``</s>``=2, and the literal strings ``<s>``/``</s>`` in text map to those ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.prompts import visual_block

_CORPUS = [
    "a man is riding a horse on the beach at sunset.",
    "two dogs play with a red ball in the park, the camera follows them.",
    "###Human: What is happening in this video?\n###Assistant: A woman is cooking pasta in a kitchen.\n###",
    "[INST] <<SYS>>\n \n<</SYS>>\n\nDescribe the image in detail. [/INST] A cat sleeps on a sofa. </s>",
    f"{visual_block('video', 0)} {visual_block('image', 0)} The video contains 8 frames sampled at 0.0, 1.2, 2.5 seconds. ",
]


def tiny_tokenizer(vocab_size: int = 400, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in milliseconds (deterministic), without ``<ImageHere>``: on a fixed
    corpus by default, or on ``corpus`` (``standins.tiny_llm`` trains one on a caption corpus)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
