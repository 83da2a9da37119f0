"""The grounded sample corpus's language: factors, captions, and reading factors back from text.

A grounded clip shows one coloured shape moving over a noisy background; its caption is a fact about the
pictures, ``a red square moves left``. The factors (colour, shape, direction) are stored with every
annotation row (columns ``colour``, ``shape``, ``direction``, ``combination``), so an evaluator scores a
generated caption per factor against them. Direction can only be read from the order of the frames.

Held-out *combinations* (``NOVEL``) never occur in the training split: a model that names them right has
composed colour, shape and direction, not memorised 48 sentences.
"""

from __future__ import annotations

import re

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
# every shape the grounded corpora draw (a corpus uses some of them: standins.sample_data.GroundedSettings);
# a shape name may be two words, matched as one phrase
SHAPES = ("square", "circle", "triangle", "wide bar", "tall bar")
DEFAULT_SHAPES = SHAPES[:3]  # the demo corpus's
DIRECTIONS = ("left", "right", "up", "down")
FACTORS = ("colour", "shape", "direction")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

# Never in the training split; each colour and each direction once, so every factor value is still seen.
NOVEL: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "up"),
    ("green", "triangle", "left"),
    ("blue", "square", "down"),
    ("yellow", "circle", "right"),
    # for corpora with bars (a corpus holds out the triples here its vocabulary can make)
    ("green", "wide bar", "up"),
    ("yellow", "tall bar", "left"),
)

# Stage-2 questions about a grounded clip, by the factor they ask for ("caption": the whole sentence).
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "direction": "Which way does it move?",
    "caption": "Describe this video.",  # also the default question of caption/chat (pipeline.generate)
}


def caption(colour: str, shape: str, direction: str) -> str:
    """The one sentence a clip with these factors is captioned with."""
    return f"a {colour} {shape} moves {direction}"


def answer(kind: str, colour: str, shape: str, direction: str) -> str:
    """The answer to ``QUESTIONS[kind]`` about a clip: the factor's word, or the caption ("caption")."""
    if kind == "caption":
        return caption(colour, shape, direction)
    return {"colour": colour, "shape": shape, "direction": direction}[kind]


def question_answers(colour: str, shape: str, direction: str, rng) -> list[dict[str, str]]:
    """A VideoChat ``QA`` list about one clip: every question once, in a random order (so each kind is
    also asked first, where inference asks it)."""
    kinds = list(QUESTIONS)
    return [
        {"q": QUESTIONS[kinds[i]], "a": answer(kinds[i], colour, shape, direction)}
        for i in rng.permutation(len(kinds))
    ]


def combinations(shapes: tuple[str, ...] = DEFAULT_SHAPES) -> list[tuple[str, str, str]]:
    """All colour x shape x direction triples of a shape vocabulary, in a fixed order."""
    return [(c, s, d) for c in COLOURS for s in shapes for d in DIRECTIONS]


def novel(shapes: tuple[str, ...] = DEFAULT_SHAPES) -> list[tuple[str, str, str]]:
    """The ``NOVEL`` triples a corpus with this shape vocabulary holds out of training."""
    return [t for t in NOVEL if t[1] in shapes]


_WORDS = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": DIRECTIONS}
_PATTERNS = {
    f: re.compile(r"\b(" + "|".join(sorted(vocab, key=len, reverse=True)) + r")\b")
    for f, vocab in _WORDS.items()
}


def read_factors(text: str) -> dict[str, str | None]:
    """The factor values a (generated) text names: the first of each factor's vocabulary it contains,
    or None. Matching is on whole words (``reds`` or ``upward`` do not count; ``wide bar`` is one)."""
    low = " ".join(re.findall(r"[a-z]+", text.lower()))
    found = {f: p.search(low) for f, p in _PATTERNS.items()}
    return {f: m.group(1) if m else None for f, m in found.items()}


# ---- scoring generated captions ---------------------------------------------------------------------


def _rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def is_grounded(text: str) -> bool:
    """Whether a text names a colour, a shape and a direction: a reference that can be scored."""
    return None not in read_factors(text).values()


def _named(r: dict[str, str | None], p: dict[str, str | None], f: str) -> bool:
    """The prediction names the reference's value of ``f``; naming none is wrong even where the
    reference names none either (no ``None == None`` match)."""
    return r[f] is not None and p[f] == r[f]


def accuracy(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Share of clips whose prediction names the reference's colour, shape, direction, and all three."""
    pairs = [(read_factors(r), read_factors(p)) for r, p in zip(references, predictions, strict=True)]
    out = {f: _rate([_named(r, p, f) for r, p in pairs]) for f in FACTORS}
    out["all"] = _rate([all(_named(r, p, f) for f in FACTORS) for r, p in pairs])
    return out


def is_novel(reference: str) -> bool:
    f = read_factors(reference)
    return (f["colour"], f["shape"], f["direction"]) in NOVEL


def by_combination(references: list[str], predictions: list[str]) -> dict[str, dict[str, float]]:
    """``accuracy`` over all clips, the seen triples and the novel (never trained) triples, with counts."""
    out = {}
    for name, keep in (("all", lambda r: True), ("seen", lambda r: not is_novel(r)), ("novel", is_novel)):
        idx = [i for i, r in enumerate(references) if keep(r)]
        out[name] = {
            "clips": len(idx),
            **accuracy([references[i] for i in idx], [predictions[i] for i in idx]),
        }
    return out


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation without fixed points: clip i gets the features of clip ``perm[i]`` != i."""
    import numpy as np

    if n < 2:
        return list(range(n))
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm.tolist()


def flipped(references: list[str], predictions: list[str]) -> float:
    """Share of clips whose prediction names the *opposite* of the reference's direction."""
    return _rate(
        [
            read_factors(p)["direction"] == OPPOSITE.get(read_factors(r)["direction"], "<none>")
            for r, p in zip(references, predictions, strict=True)
        ]
    )
