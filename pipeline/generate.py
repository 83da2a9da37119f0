"""Prompts for inference and generation through the LLM's own ``generate(inputs_embeds=...)``.

* ``caption`` (stage 1): ``[BOS] <32 video tokens>``, the model continues with a caption and "\\n".
* ``vicuna`` / ``llama2`` (stage 2): the training template up to the open assistant turn, as the
  original's ``Conversation.get_prompt()``: ``...###Assistant:`` / ``...[/INST]``; the first question
  carries ``<Video><ImageHere>*32</Video> The video contains 8 frames sampled at ... seconds.``

Both prompts are built by pipeline.prompts (``stage1_prompt``, ``conversation_prompt``), which owns every
prompt fact; this module pads, generates and cuts at the stop strings.

Defaults are the original's inference: sampling with top_p 0.9, temperature 1.0, 300 new tokens, stop at
``###`` (Vicuna) or ``</s>``; the stage-1 prompt also stops at the newline that ends every training caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.config import ConfigError
from pipeline.model import VideoLLaMA
from pipeline.prompts import TextSample, conversation_prompt, frame_times_message, stage1_prompt

Template = Literal["caption", "vicuna", "llama2"]
DEFAULT_STOPS = {"caption": ["\n", "###"], "vicuna": ["###"], "llama2": ["</s>"]}


@dataclass
class GenerationConfig:
    template: Template = "caption"
    prompt: str | None = None  # the question for vicuna/llama2 (caption command); None: stage-1 prompt
    do_sample: bool = True  # false: greedy, deterministic
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 300
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: list[str] | None = None  # default: DEFAULT_STOPS[template]; EOS always stops
    seed: int | None = None  # sampling seed (reproducible sampling)
    batch_size: int = 8  # videos per generate call

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise ConfigError("generation: max_new_tokens, num_beams and batch_size must be >= 1")
        if not (0 < self.top_p <= 1) or self.temperature <= 0:
            raise ConfigError("generation: top_p must be in (0, 1] and temperature > 0")

    @property
    def effective_template(self) -> Template:
        """``--prompt`` without ``--template`` means the Vicuna conversation template."""
        return "vicuna" if self.prompt is not None and self.template == "caption" else self.template

    def stops(self) -> list[str]:
        return list(self.stop) if self.stop is not None else list(DEFAULT_STOPS[self.effective_template])


def left_pad(prompts: Sequence[TextSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding: every row's last prompt token sits at the end, where generation continues."""
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    video = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, p in enumerate(prompts):
        off = length - len(p.input_ids)
        ids[row, off:] = torch.tensor(p.input_ids)
        mask[row, off:] = 1
        video[row, [off + i for i in p.video_positions]] = True
    return {"input_ids": ids, "attention_mask": mask, "video_mask": video}


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (generation stops after it; it is not part of the answer)."""
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)] if cuts else text).strip()


@torch.no_grad()
def generate(
    model: VideoLLaMA,
    tokenizer,
    features: torch.Tensor,
    prompts: Sequence[TextSample],
    gen: GenerationConfig,
    streamer=None,
) -> list[str]:
    """One answer per row of ``features`` [B,T,Q,D] with its prompt; rows may differ in length.
    ``streamer`` (a transformers streamer, one row) receives the tokens as they are generated."""
    device = features.device
    batch = {k: v.to(device) for k, v in left_pad(prompts, tokenizer.pad_token_id).items()}
    embeds = model.embed_with_video(batch["input_ids"], batch["video_mask"], model.video_tokens(features))
    sampling = {"top_p": gen.top_p, "temperature": gen.temperature} if gen.do_sample else {}
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    out = model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        max_new_tokens=gen.max_new_tokens,
        do_sample=gen.do_sample,
        num_beams=gen.num_beams,
        repetition_penalty=gen.repetition_penalty,
        stop_strings=[s for s in gen.stops() if s] or None,
        tokenizer=tokenizer,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [cut_at_stop(t, gen.stops()) for t in texts]


def generate_batched(model, tokenizer, features: torch.Tensor, prompts, gen: GenerationConfig) -> list[str]:
    """``generate`` in chunks of ``gen.batch_size`` rows."""
    out: list[str] = []
    for i in range(0, len(prompts), gen.batch_size):
        j = i + gen.batch_size
        out += generate(model, tokenizer, features[i:j], prompts[i:j], gen)
    return out


@dataclass
class PromptSpec:
    """What goes around the video: the stage-1 prompt, or one question in a conversation template."""

    template: Template = "caption"
    question: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)

    def build(self, tokenizer, num_video_tokens: int, timestamps: Sequence[float] | None) -> TextSample:
        if self.template == "caption":
            return stage1_prompt(tokenizer, num_video_tokens)
        message = frame_times_message(timestamps) if timestamps else ""
        question = self.question if self.question is not None else "Describe this video."
        return conversation_prompt(
            tokenizer, self.history, question, self.template, message, num_video_tokens
        )


def prompt_spec(gen: GenerationConfig) -> PromptSpec:
    return PromptSpec(gen.effective_template, gen.prompt)


def caption_features(
    model: VideoLLaMA,
    tokenizer,
    features: torch.Tensor,
    gen: GenerationConfig,
    timestamps: list | None = None,
) -> list[str]:
    """Captions (or answers to ``gen.prompt``) for a batch of features [B,T,Q,D]."""
    spec = prompt_spec(gen)
    n = model.cfg.num_video_query_tokens
    stamps = timestamps or [None] * len(features)
    prompts = [spec.build(tokenizer, n, t) for t in stamps]
    return generate_batched(model, tokenizer, features, prompts, gen)
