"""Stage 1 *learns*: a grounded corpus -> tiny LLM + tiny encoder -> feature cache -> training with the
shipped configs/stage1_tiny.yaml -> greedy captions of held-out clips name what the clips show.

Two chains, all through cli.py as a user runs them, share one tiny encoder (it never sees a corpus):
- the demo's corpus (``learned``), which stage 2, the conversation and caption-shards checks build on;
- the held-out variant ``slow`` (``variant``), a corpus no setting of the recipe was chosen on
  (docs/LEARNING.md, issue 20): its moves cross a quarter of the frame or less. With the original's
  frame position init the recipe got its direction in one run of three (58.9-89.3 %); with the
  shipped ordered init, 96.4 % in both runs measured.
The targets are the issues': colour >= 95 %, direction >= 85 %, shape >= 75 %, all three >= 60 % on
held-out clips, on the held-out variant each within 10 points of what a linear probe reads from the same
cached features; features shuffled across clips drop to about chance; reversed frames flip the direction.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from standins.sample_data import make_grounded_sample, variant_settings

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
HELDOUT_VARIANT = "slow"  # a held-out member of the family (standins.sample_data.VARIANTS)
TARGETS = {"colour": 0.95, "shape": 0.75, "direction": 0.85, "all": 0.60}


def cli(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, f"cli.py {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encoder") / "encoder"
    cli("tiny-encoder", "--output", str(out))
    return out


def run_chain(root: Path, encoder: Path, variant: str | None) -> dict:
    """Corpus (with its faulty rows), tiny LLM on its captions, feature caches of both splits, stage 1,
    then grounded-eval with both ablations and the linear probes."""
    settings, seed = variant_settings(variant)
    corpus = make_grounded_sample(root / "corpus", settings, seed=seed, faults=True, workers=2)
    cli("tiny-llm", "--annotations", corpus["train"], "--output", str(root / "llm"))
    for split in ("train", "heldout"):
        cli(
            "preprocess", "--annotations", corpus[split], "--videos", corpus["videos"],
            "--output", str(root / f"{split}_shards"), "--size", "56", "--samples-per-shard", "64",
            "--cache-features", "--encoder", "tiny", f"features.blip2_path={encoder}",
        )  # fmt: skip
    t0 = time.monotonic()
    cli(
        "train", "--config", str(REPO / "configs" / "stage1_tiny.yaml"), f"data.shards={root / 'train_shards'}",
        f"run_dir={root / 'run'}", f"model.llm_path={root / 'llm'}",
    )  # fmt: skip
    train_seconds = time.monotonic() - t0
    cli(
        "grounded-eval", str(root / "run"), str(root / "heldout_shards"), "--output", str(root / "eval"),
        "--probe", str(root / "train_shards"),
    )  # fmt: skip
    return {
        "root": root,
        "llm": json.loads((root / "llm" / "tiny_llm.json").read_text()),
        "eval": json.loads((root / "eval" / "grounded_eval.json").read_text()),
        "train_seconds": train_seconds,
    }


@pytest.fixture(scope="module")
def learned(tmp_path_factory, encoder):
    return run_chain(tmp_path_factory.mktemp("learning"), encoder, None)


@pytest.fixture(scope="module")
def variant(tmp_path_factory, encoder):
    return run_chain(tmp_path_factory.mktemp(f"variant-{HELDOUT_VARIANT}"), encoder, HELDOUT_VARIANT)


def test_the_tiny_llm_reads_its_context(learned):
    r = learned["llm"]
    assert r["loss_filler_prefix"] > 0.4  # the grammar alone cannot tell colour, shape and direction
    assert r["loss_informative_prefix"] < 0.2 * r["loss_filler_prefix"]
    assert min(r["answer_accuracy"].values()) >= 0.9, r["answer_accuracy"]  # and answers from it


def test_the_tiny_encoder_knows_shapes_on_new_scenes(encoder):
    h = json.loads((encoder / "tiny_encoder.json").read_text())["heldout"]
    assert h["shape_accuracy"] >= 0.7 and h["centre_error"] <= 0.1 and h["colour_error"] <= 15, h


def test_training_fits_the_time_budget(learned):
    assert learned["train_seconds"] <= 240  # issue 13: stage 1 in at most 4 minutes on the 2-core machine


def test_every_row_is_accounted_for(learned):
    summary = json.loads((learned["root"] / "train_shards" / "summary.json").read_text())
    assert (summary["total"], summary["ok"], summary["failed"]) == (264 + 3, 264, 3)


def test_held_out_captions_name_colour_shape_and_direction(learned):
    a = learned["eval"]["heldout"]["all"]
    assert a["clips"] == 56
    assert all(a[k] >= t for k, t in TARGETS.items()), a


def test_shuffled_features_drop_to_chance_and_reversed_frames_flip_the_direction(learned):
    check_ablations(learned["eval"])


def check_ablations(r: dict) -> None:
    s = r["shuffled"]
    # the captions follow the features they were given, not the clip they belong to
    assert s["all"] <= s["chance"]["all"] + 0.1 and s["follows_features"] >= 0.5, s
    assert r["reversed"]["direction_flipped"] >= 0.6 and r["reversed"]["colour_kept"] >= 0.9, r["reversed"]


def test_a_held_out_variant_meets_the_targets_within_10_points_of_its_probe(variant):
    """Issue 20: on a corpus of the family that no recipe setting was chosen on, the shipped config
    reaches every target, and no factor stays more than 10 points below what the encoder carries."""
    r = variant["eval"]
    a, probe = r["heldout"]["all"], r["probe"]
    assert a["clips"] == 56 and probe["clips"] == 56 and probe["train_clips"] == 264, (a, probe)
    assert all(a[k] >= t for k, t in TARGETS.items()), a
    assert all(a[k] >= probe[k] - 0.10 for k in TARGETS), {k: (a[k], probe[k]) for k in TARGETS}
    check_ablations(r)
    assert variant["train_seconds"] <= 240


@pytest.fixture(scope="module")
def stage2(learned, encoder):
    """Stage 2 with the shipped configs/stage2_tiny.yaml on the corpus's VideoChat conversations, from the
    stage-1 export; held-out questions asked as `chat` asks them."""
    root = learned["root"]
    corpus = root / "corpus"
    cli(
        "preprocess", "--dataset", "videochat", "--annotations", str(corpus / "train" / "videochat.json"),
        "--videos", str(corpus / "videos"), "--output", str(root / "vc_shards"), "--samples-per-shard", "64",
        "--cache-features", "--encoder", "tiny", f"features.blip2_path={encoder}",
    )  # fmt: skip
    cli(
        "train", "--config", str(REPO / "configs" / "stage2_tiny.yaml"), f"init_from={root / 'run' / 'export'}",
        f"run_dir={root / 'run2'}", f"model.llm_path={root / 'llm'}", f"data.datasets=[{{shards: {root / 'vc_shards'}}}]",
    )  # fmt: skip
    cli(
        "grounded-eval", str(root / "run2"), str(root / "heldout_shards"), "--questions", "vicuna",
        "--output", str(root / "eval2"),
    )  # fmt: skip
    return json.loads((root / "eval2" / "grounded_qa.json").read_text())


def test_stage2_answers_questions_about_held_out_clips(stage2):
    assert stage2["clips"] == 56 and stage2["template"] == "vicuna"
    accuracy = {k: q["all"] for k, q in stage2["questions"].items()}
    assert set(accuracy) == {"colour", "shape", "direction", "caption"}, stage2
    assert all(a >= 0.85 for a in accuracy.values()), accuracy


def test_caption_shards_gives_the_evaluated_captions(learned):
    root = learned["root"]
    out = root / "captions.jsonl"
    cli(
        "caption-shards",
        str(root / "run"),
        str(root / "heldout_shards"),
        "--output",
        str(out),
        "--greedy",
        "--max-new-tokens",
        "20",  # grounded-eval's cap: a clip whose caption runs on is cut at the same token
        "--workers",
        "2",
    )
    got = {json.loads(line)["key"]: json.loads(line)["caption"] for line in out.read_text().splitlines()}
    evaluated = [
        json.loads(line) for line in (root / "eval" / "grounded_captions.jsonl").read_text().splitlines()
    ]
    assert {r["key"]: r["caption"] for r in evaluated} == got


def test_stage2_answers_over_a_conversation(learned, stage2):
    """The three questions in one conversation per held-out clip (chat's and the web demo's way, each
    clip its own question order): every turn answered as well as a first question. With the original's
    label masking on the tiny BPE tokenizer, third-turn answers fell to 11 % (colour) and 0 % (shape)."""
    import csv
    import itertools

    from infer.load import ModelSource
    from infer.serve import Demo, ServeConfig
    from pipeline.generate import GenerationConfig

    root = learned["root"]
    questions = {"colour": "What colour is the shape?", "shape": "What shape is it?",
                 "direction": "Which way does it move?"}  # fmt: skip
    orders = list(itertools.permutations(questions))
    gen = GenerationConfig(template="vicuna", do_sample=False, max_new_tokens=12)
    demo = Demo(ServeConfig(model=ModelSource(checkpoint=str(root / "run2"), device="cpu"), generation=gen))
    rows = list(csv.DictReader((root / "corpus" / "heldout" / "annotations" / "0.csv").open()))
    right = {(k, turn): [] for k in questions for turn in range(3)}
    for i, row in enumerate(rows):
        clip = demo.read(root / "corpus" / "videos" / row["page_dir"] / f"{row['videoid']}.mp4")
        history = []
        for turn, k in enumerate(orders[i % len(orders)]):
            answer = list(demo.stream(clip, history, questions[k], gen))[-1]
            history.append((questions[k], answer))
            right[k, turn].append(row[k] in answer.lower().replace(".", " ").replace(",", " ").split())
    rate = {key: sum(v) / len(v) for key, v in right.items()}
    overall = {k: sum(sum(right[k, t]) for t in range(3)) / len(rows) for k in questions}
    assert len(rows) == 56 and min(rate[k, 2] for k in questions) >= 0.6, rate
    assert overall["colour"] >= 0.95 and overall["direction"] >= 0.85 and overall["shape"] >= 0.75, overall
