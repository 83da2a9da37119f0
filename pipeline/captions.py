"""Caption cleaning, shared by preprocessing (the captions written to shards) and evaluation (generated
captions are cleaned the same way before they are scored against those references)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.config import ConfigError


@dataclass
class CaptionCleaning:
    """As in the original: lower-case, strip ``[.!"()*#:;~]``, at most 50 words (``caption.*`` keys)."""

    clean: bool = True
    lowercase: bool = True
    strip_chars: str = '.!"()*#:;~'
    max_words: int = 50

    def validate(self) -> None:
        if self.max_words < 1:  # a negative cut would silently drop the last words of every caption
            raise ConfigError(f"caption.max_words: {self.max_words} must be >= 1")


def clean_caption(text: str, cfg: CaptionCleaning) -> str:
    """BLIP's ``pre_caption``: lower-case, listed punctuation to spaces, collapse spaces, cut to max words."""
    if not cfg.clean:
        return text.strip()
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_chars:
        text = re.sub(f"[{re.escape(cfg.strip_chars)}]", " ", text)
    text = re.sub(r"\s{2,}", " ", text).strip()
    return " ".join(text.split(" ")[: cfg.max_words])
