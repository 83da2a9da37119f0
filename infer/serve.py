"""The local web demo (the original's ``demo.py``): upload a video or an image, see the sampled frames, chat.

    python cli.py serve demo_out/run_stage2                       # tiny preset, CPU: http://127.0.0.1:7860
    python cli.py serve runs/stage2 --llm /models/vicuna-7b --blip2 /models/blip2   # real size, one GPU
    python cli.py serve videollama-stage2.pth --llm DIR --blip2 DIR --template llama2

It loads what ``chat`` loads (a run folder, an export, a released ``.pth``: infer.load) and asks as ``chat``
asks: the stage-2 conversation template with the frame times in the first turn, every answer added to the
history the next question sees (pipeline.generate). Tokens appear as they are generated.

Safe defaults: it listens on 127.0.0.1 (``--host 0.0.0.0`` exposes it, with a warning); one model is held
in memory and every request that runs it goes through one queue (one at a time, the others wait); uploads
are limited in size; an upload that cannot be read gets a message in the page and the next one works.

Scripts call it without a browser; each call is a fresh conversation with greedy decoding::

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(handle_file("clip.mp4"), "What happens?", api_name="/answer")
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infer.caption import VideoError, features_of, read_video
from infer.load import Loaded, ModelSource, load, resolve
from pipeline.config import ConfigError
from pipeline.generate import GenerationConfig, PromptSpec, cut_at_stop, generate

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MODEL_QUEUE = "model"  # every event that runs the model shares this concurrency group (limit 1)


@dataclass
class ServeConfig:
    model: ModelSource = field(default_factory=ModelSource)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(template="vicuna"))
    num_frames: int = 8  # frames sampled uniformly from a video, as chat
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: float = 200.0  # larger uploads are refused by the server before they are stored
    max_queue: int = 32  # waiting requests beyond this are turned away with a message
    examples: list[str] = field(default_factory=list)  # video/image files offered as examples

    @classmethod
    def fill_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A conversation, not a caption: ``generation.template`` is vicuna unless given (as chat)."""
        gen = data.get("generation")
        if isinstance(gen, dict):
            return {**data, "generation": {"template": "vicuna", **gen}}
        return data

    def validate(self) -> None:
        if self.generation.template == "caption":
            raise ConfigError("generation.template: the demo needs a conversation template, vicuna or llama2")
        if not 1 <= self.num_frames <= 32 or self.max_upload_mb <= 0 or self.max_queue < 1:
            raise ConfigError("num_frames must be in 1..32, max_upload_mb > 0 and max_queue >= 1")
        if missing := [e for e in self.examples if not Path(e).is_file()]:
            raise ConfigError(f"examples: {missing[0]!r} is not a file")

    @property
    def exposed(self) -> bool:
        return self.host not in LOCAL_HOSTS


@dataclass
class Clip:
    """One upload, read and encoded once: its sampled frames, their times and the frozen features."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    timestamps: list[float] | None  # None for an image
    features: torch.Tensor  # [1, T, Q, D] on the model's device

    def describe(self) -> str:
        if self.timestamps is None:
            return "an image"
        times = ", ".join(f"{t:.1f}" for t in self.timestamps)
        return f"{len(self.frames)} frames sampled at {times} s"


def read_image(path: Path, size: int) -> np.ndarray:
    """An image as a one-frame clip ``[1,size,size,3]``, squashed as the original's image processor."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))[None]
    except (UnidentifiedImageError, OSError) as e:
        raise VideoError(f"image {path.name!r} cannot be read: {e}") from None


class Demo:
    """The model and what the page does with it, without the page (tests and the API use this)."""

    def __init__(self, cfg: ServeConfig, loaded: Loaded | None = None):
        self.cfg = cfg
        self.loaded = loaded or load(cfg.model, resolve(cfg.model))
        self.lock = threading.Lock()  # the queue runs one request at a time; this makes it a fact

    def read(self, path: str | Path) -> Clip:
        """The upload's frames and features, or VideoError with a message for the page."""
        path = Path(path)
        size = self.loaded.model.cfg.image_size
        if path.suffix.lower() in IMAGE_SUFFIXES:
            frames, stamps = read_image(path, size), None
        else:
            clip = read_video(path, self.cfg.num_frames, size)
            frames, stamps = clip["frames"], [float(t) for t in clip["timestamps"]]
        with self.lock:
            features = features_of(self.loaded, [frames])
        return Clip(frames, stamps, features)

    def stream(
        self, clip: Clip, history: list[tuple[str, str]], question: str, gen: GenerationConfig
    ) -> Iterator[str]:
        """The answer so far, after each new piece of text (the last one is the whole answer)."""
        from transformers import TextIteratorStreamer

        tok, model = self.loaded.tokenizer, self.loaded.model
        prompt = PromptSpec(gen.template, question, history).build(
            tok, model.cfg.num_video_query_tokens, clip.timestamps
        )
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["answer"] = generate(model, tok, clip.features, [prompt], gen, streamer=streamer)[0]
            except BaseException as e:  # surfaced in the caller's thread below
                result["error"] = e
                streamer.end()

        with self.lock:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            try:
                text = ""
                for piece in streamer:
                    text += piece
                    yield cut_at_stop(text, gen.stops())
            finally:  # also when the page goes away mid-answer: the model is free again only after this
                thread.join()
        if "error" in result:
            raise result["error"]
        yield result["answer"]

    def answer(self, clip: Clip, question: str) -> str:
        """One question in a fresh conversation, greedy: the ``/answer`` API."""
        gen = replace(self.cfg.generation, do_sample=False)
        *_, last = self.stream(clip, [], question, gen)
        return last


def generation_from(
    base: GenerationConfig, decoding: str, temperature: float, max_new: int
) -> GenerationConfig:
    """The page's generation settings over the configured ones (top_p etc. stay as configured)."""
    gen = replace(
        base, do_sample=decoding == "sampling", temperature=float(temperature), max_new_tokens=int(max_new)
    )
    gen.validate()
    return gen


def run(cfg: ServeConfig, block: bool = True):
    """Load the model, build the page and serve it; returns the Gradio app (``block=False``: at once)."""
    from infer.serve_page import build_page

    if cfg.exposed:
        print(
            f"[serve] WARNING: listening on {cfg.host}, not 127.0.0.1: anyone who can reach this machine "
            "can use the model and upload files; there is no login.",
            file=sys.stderr,
        )
    demo = Demo(cfg)
    app = build_page(demo)
    app.queue(max_size=cfg.max_queue, default_concurrency_limit=1)
    app.launch(
        server_name=cfg.host,
        server_port=cfg.port,
        max_file_size=int(cfg.max_upload_mb * 2**20),
        prevent_thread_lock=not block,
        show_error=True,
        quiet=False,
    )
    return app
