"""A multi-turn question/answer session about one video, in the terminal or through a pipe.

    python cli.py chat runs/stage2 clip.mp4 --llm /models/vicuna-7b --blip2 /models/blip2
    printf 'What is in the video?\\nWhat colour is it?\\n' | python cli.py chat runs/stage1_tiny clip.mp4 --greedy

Each stdin line is a question; an empty line or end of input ends the session. The conversation uses the
stage-2 template (``--template vicuna|llama2``) with the frame-timestamp message in the first turn, and
every answer is added to the history the next question sees, as in the original demo.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from infer.caption import features_of, read_video
from infer.load import ModelSource, load, resolve
from pipeline.config import ConfigError
from pipeline.generate import GenerationConfig, PromptSpec, generate


@dataclass
class ChatConfig:
    model: ModelSource = field(default_factory=ModelSource)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(template="vicuna"))
    video: str = ""
    num_frames: int = 8

    def validate(self) -> None:
        if not self.video:
            raise ConfigError("video: give a video file")
        if self.generation.template == "caption":
            raise ConfigError("generation.template: chat needs a conversation template, vicuna or llama2")


def run(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[tuple[str, str]]:
    """Answer each line of ``stdin``; returns the (question, answer) turns."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    resolved = resolve(cfg.model)
    clip = read_video(cfg.video, cfg.num_frames, resolved.mcfg.image_size)
    interactive = stdin.isatty()
    first = None if interactive else stdin.readline().strip()  # piped: know before loading the model
    if first == "":
        raise ConfigError(
            "chat: no question on stdin (give one question per line, e.g. printf 'What happens?\\n' | "
            "python cli.py chat CHECKPOINT VIDEO)"
        )
    loaded = load(cfg.model, resolved)
    features = features_of(loaded, [clip["frames"]])
    n = loaded.model.cfg.num_video_query_tokens
    history: list[tuple[str, str]] = []
    while True:
        if interactive:
            stdout.write("USER: ")
            stdout.flush()
        question = first if first else stdin.readline().strip()
        first = None
        if not question:  # empty line or EOF
            break
        spec = PromptSpec(cfg.generation.template, question, history)
        prompt = spec.build(loaded.tokenizer, n, clip["timestamps"])
        answer = generate(loaded.model, loaded.tokenizer, features, [prompt], cfg.generation)[0]
        history.append((question, answer))
        stdout.write(f"ASSISTANT: {answer}\n")
        stdout.flush()
    return history
