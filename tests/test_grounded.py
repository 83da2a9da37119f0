"""The grounded sample corpus and the corpus-trained tiny LLM (cli.py make-sample --grounded, tiny-llm)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import grounded
from standins.sample_data import (
    VARIANTS,
    GroundedClip,
    GroundedSettings,
    grounded_frames,
    make_grounded_sample,
    plan_grounded,
)

REPO = Path(__file__).resolve().parents[1]


def test_plan_holds_every_seen_triple_and_keeps_the_novel_ones_out_of_training():
    plan = plan_grounded(GroundedSettings(), seed=0)
    train = [(c.colour, c.shape, c.direction) for c in plan["train"]]
    held = plan["heldout"]
    assert len(train) == 44 * 6 and len(held) == 44 + 4 * 3
    assert not set(grounded.NOVEL) & set(train)
    assert {t: train.count(t) for t in set(train)} == {
        t: 6 for t in grounded.combinations() if t not in grounded.NOVEL
    }
    assert (
        sorted({(c.colour, c.shape, c.direction) for c in held if c.combination == "novel"})
        == sorted(
            grounded.NOVEL[:4]  # the demo's shapes: the four triples of its vocabulary
        )
        == sorted(grounded.novel())
    )
    ids = [c.videoid for c in plan["train"] + held]
    assert len(set(ids)) == len(ids)
    assert all(5.0 <= c.seconds <= 7.0 for c in plan["train"] + held)


@pytest.mark.parametrize("direction", grounded.DIRECTIONS)
def test_the_shape_moves_its_way_and_has_its_colour(direction):
    clip = GroundedClip("1", "p", "blue", "circle", direction, "seen", 5.0, seed=7)
    frames = [f.copy() for f in grounded_frames(clip, 125, 596, 336)(0, 125)]
    colour = np.array(grounded.COLOURS["blue"])
    centres = []
    for f in (frames[0], frames[-1]):
        ys, xs = np.nonzero((f == colour).all(-1))
        assert len(xs) > 2000  # the disc is there, in exactly its colour
        centres.append(np.array([xs.mean(), ys.mean()]))
    dx, dy = centres[1] - centres[0]
    moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
    assert moved[direction] > 50 and all(
        abs(v) < 1 for k, v in moved.items() if k not in (direction, grounded.OPPOSITE[direction])
    )


def test_read_factors_matches_whole_words():
    assert grounded.read_factors("a red square moves left") == {
        "colour": "red",
        "shape": "square",
        "direction": "left",
    }
    assert grounded.read_factors("reds upward circles") == {"colour": None, "shape": None, "direction": None}
    assert grounded.caption(*grounded.NOVEL[0]) == "a red circle moves up"


def test_make_sample_grounded_writes_both_splits_with_factors_and_faults(tmp_path):
    """Small clips (the layout, columns and faulty rows are what this checks; sizes are the default's;
    192x128 is the least at which x264 would choose 2 threads of its own on 2 cores)."""
    small = GroundedSettings(
        per_combination=1, heldout_per_combination=0, novel_per_combination=1, seconds=(1.0, 1.0)
    )
    paths = make_grounded_sample(tmp_path, small, width=192, height=128, fps=4, faults=True, workers=1)
    rows = {s: list(csv.DictReader((Path(paths[s]) / "0.csv").open())) for s in ("train", "heldout")}
    assert len(rows["train"]) == 44 + 3 and len(rows["heldout"]) == 4
    good = [r for r in rows["train"] if r["colour"]]
    assert all(r["name"] == grounded.caption(r["colour"], r["shape"], r["direction"]) for r in good)
    assert all(
        (Path(paths["videos"]) / r["page_dir"] / f"{r['videoid']}.mp4").stat().st_size > 0 for r in good
    )
    assert [r["videoid"] for r in rows["train"] if not r["colour"]] == [
        "9000000001",
        "9000000002",
        "9000000003",
    ]
    assert {r["combination"] for r in rows["heldout"]} == {"novel"}
    # the same bytes from 2 worker processes, and one x264 thread per clip (its frame threads make the
    # stream depend on the machine's core count): x264 writes its options into the stream
    videos = sorted(Path(paths["videos"]).rglob("*.mp4"))
    again = make_grounded_sample(
        tmp_path / "again", small, width=192, height=128, fps=4, faults=True, workers=2
    )
    for video in videos:
        data = video.read_bytes()
        same = data == (Path(again["videos"]) / video.relative_to(paths["videos"])).read_bytes()
        one_thread = not data or b" threads=1 lookahead_threads=1 " in data  # the empty faulty row
        assert same and one_thread, (video, same, one_thread)


def test_a_clip_is_the_same_bytes_whatever_the_heap_held():
    """x264's macroblock tree read memory it had not written: with glibc's MALLOC_PERTURB_ (fill new
    heap memory with a byte) the default options gave another stream for this very clip, and a rerun of
    the demo's corpus one clip of 321 different."""
    code = (
        "import hashlib, io; from standins.sample_data import write_clip; b = io.BytesIO(); "
        "write_clip(b, 2.0, width=96, height=64, seed=3); print(hashlib.sha256(b.getvalue()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "MALLOC_PERTURB_": perturb},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for perturb in ("0", "1", "2")
    }
    assert len(digests) == 1, digests


# ---- tiny-llm --------------------------------------------------------------------------------------------


def _annotations(tmp_path: Path, captions: list[tuple[str, str, str]] | None = None) -> Path:
    path = tmp_path / "ann" / "0.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "page_dir", "name", "colour", "shape", "direction"])
        for i, t in enumerate(captions or grounded.combinations()):
            w.writerow([i, "p", grounded.caption(*t).capitalize() + ".", *t])
    return path.parent


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=cwd, capture_output=True, text=True)


def test_tiny_llm_conversations_are_multi_turn_like_the_stage2_corpus():
    """The tiny LLM learns whole VideoChat-style conversations (a random order of the questions, 1 to 4
    turns), not only first turns: with single-turn training, stage 2 answered "Describe this video."
    with the bare shape word on 11 of 56 held-out clips (docs/LEARNING.md), none with this."""
    from pipeline.prompts import IGNORE_INDEX
    from pipeline.tiny import tiny_tokenizer
    from standins.tiny_llm import SequenceBuilder, conversation_turns, template_text

    row = {"caption": "a red square moves left", "colour": "red", "shape": "square", "direction": "left"}
    rng = np.random.default_rng(0)
    drawn = [conversation_turns(row, rng) for _ in range(400)]
    assert {len(t) for t in drawn} == {1, 2, 3, 4}
    assert {t[0][0] for t in drawn} == set(grounded.QUESTIONS.values())  # every kind is asked first
    for turns in drawn:
        assert len({q for q, _ in turns}) == len(turns)  # each question at most once
        for q, a in turns:
            kind = next(k for k, v in grounded.QUESTIONS.items() if v == q)
            assert a == grounded.answer(kind, "red", "square", "left")
    assert conversation_turns(row, rng, "shape") == [(grounded.QUESTIONS["shape"], "square")]
    assert conversation_turns({"caption": "a dog"}, rng) == [(grounded.QUESTIONS["caption"], "a dog")]

    tok = tiny_tokenizer(400, [row["caption"] + "\n", *template_text()])
    builder = SequenceBuilder(tok)
    for seed in range(20):
        e = builder.conversation(row, np.random.default_rng(seed))
        text = tok.decode([t for t in e.input_ids if t != 0])
        supervised = tok.decode([t for t in e.labels if t != IGNORE_INDEX])
        n = sum(text.count(q) for q in grounded.QUESTIONS.values())
        assert n == text.count("###Human:") + text.count("[INST]") >= 1
        assert supervised.count("square") == text.count("square") - 1  # every answer, not the prefix


@pytest.mark.slow
def test_tiny_llm_is_deterministic_and_loads_with_auto_classes(tmp_path):
    """(That it reads its context is asserted on the default steps in test_learning.py.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from standins.tiny_llm import TinyLLMConfig, run

    ann = _annotations(tmp_path)
    reports = [run(TinyLLMConfig(str(ann), str(tmp_path / f"llm{i}"), steps=20, seed=3)) for i in (0, 1)]
    a, b = ((tmp_path / f"llm{i}" / "model.safetensors").read_bytes() for i in (0, 1))
    assert a == b and reports[0]["loss_informative_prefix"] == reports[1]["loss_informative_prefix"]
    assert reports[0]["last_loss"] < reports[0]["first_loss"] - 1.0
    other = run(TinyLLMConfig(str(ann), str(tmp_path / "llm2"), steps=20, seed=4))
    assert other["loss_informative_prefix"] != reports[0]["loss_informative_prefix"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "llm0")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm0")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    text = "a red square moves left\n"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    ids = torch.tensor([[1, *tok("a red", add_special_tokens=False).input_ids]])
    assert llm(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert llm.config.hidden_size == 64  # the tiny preset's llm_hidden_size: model.llm_path=DIR fits it


@pytest.mark.slow  # three CLI processes, each importing torch + transformers
def test_tiny_llm_refuses_annotations_without_captions(tmp_path):
    (tmp_path / "nocap.csv").write_text("videoid,page_dir\n1,p\n")
    (tmp_path / "empty.csv").write_text("videoid,page_dir,name\n1,p,\n")
    for name in ("nocap.csv", "empty.csv"):
        r = _cli("tiny-llm", "--annotations", str(tmp_path / name), "--output", str(tmp_path / "out"))
        assert r.returncode != 0
        assert f"annotations: '{tmp_path / name}' holds no captions" in r.stderr
    r = _cli("tiny-llm", "--annotations", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert f"annotations: '{tmp_path / 'missing'}' does not exist" in r.stderr
    assert not (tmp_path / "out").exists()


def test_scores_per_factor_seen_vs_novel_and_the_ablation_helpers():
    refs = [
        grounded.caption(*t) for t in (("red", "square", "left"), ("blue", "circle", "up"), grounded.NOVEL[0])
    ]
    preds = ["a red square moves left", "a blue circle moves down", "a red triangle moves up"]
    r = grounded.by_combination(refs, preds)
    assert r["all"] == {"clips": 3, "colour": 1.0, "shape": 2 / 3, "direction": 2 / 3, "all": 1 / 3}
    assert r["seen"]["clips"] == 2 and r["seen"]["direction"] == 0.5
    assert r["novel"] == {"clips": 1, "colour": 1.0, "shape": 0.0, "direction": 1.0, "all": 0.0}
    assert grounded.flipped(refs, preds) == 1 / 3  # up -> down
    perm = grounded.derangement(50, seed=1)
    assert sorted(perm) == list(range(50)) and all(p != i for i, p in enumerate(perm))
    assert perm == grounded.derangement(50, seed=1)


def test_a_factor_named_by_neither_side_is_not_a_match():
    """Captions outside the grounded grammar used to score 100 % (None == None) and flipped() raised
    KeyError: None; a prediction that names no factor is wrong."""
    refs = ["a dog runs on the beach", grounded.caption("red", "square", "left")]
    preds = ["a cat sleeps", ""]
    assert grounded.accuracy(refs, preds) == {"colour": 0.0, "shape": 0.0, "direction": 0.0, "all": 0.0}
    assert grounded.flipped(refs, preds) == 0.0
    assert not grounded.is_grounded(refs[0]) and grounded.is_grounded(refs[1])
    assert grounded.accuracy(refs[1:], ["the red square moves left"])["all"] == 1.0


def _feature_shards(folder: Path, captions: list[str]) -> Path:
    from pipeline.shards import ShardWriter, shard_name

    folder.mkdir()
    w = ShardWriter(folder / shard_name(0, "webdataset"), "webdataset")
    rng = np.random.default_rng(0)
    for i, text in enumerate(captions):
        feats = rng.normal(size=(8, 32, 64)).astype(np.float16)  # the tiny preset's features
        w.write({"key": f"{i:09d}", "caption": text, "meta": {"videoid": f"v{i}"}, "features": feats})
    w.commit()
    return folder


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    import torch

    from pipeline.model import VideoLLaMA, tiny
    from pipeline.weights import export_trainable

    torch.manual_seed(0)
    return export_trainable(VideoLLaMA(tiny()), tiny(), tmp_path_factory.mktemp("grounded") / "export")


def test_grounded_eval_refuses_ungrounded_shards_and_an_unwritable_output_before_any_work(
    tiny_export, tmp_path
):
    from click.testing import CliRunner

    import cli
    from tests.conftest import unwritable_folder

    webvid = _feature_shards(tmp_path / "webvid", ["a dog runs on the beach", "two people talk", "a red bus"])
    r = CliRunner().invoke(cli.main, ["grounded-eval", str(tiny_export), str(webvid), "--no-ablations"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "3 of 3 references" in r.output and "are not grounded captions" in r.output
    good = _feature_shards(tmp_path / "good", [grounded.caption(*t) for t in grounded.combinations()[:3]])
    out = unwritable_folder(tmp_path) / "eval"
    r = CliRunner().invoke(cli.main, ["grounded-eval", str(tiny_export), str(good), "--output", str(out)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"Error: output: cannot write in {str(out)!r}")
    r = CliRunner().invoke(
        cli.main,
        ["grounded-eval", str(tiny_export), str(good), "--output", str(tmp_path / "ok"), "--device", "cpu"],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ok" / "grounded_eval.json").is_file()


def test_tiny_stand_ins_check_arguments_and_output_before_training(tmp_path):
    """tiny-encoder / tiny-llm used to train for minutes and then fail writing (OSError), and lr=-1
    ended in AdamW's traceback: each is one line now, before the first step (--steps 3 keeps the old
    behaviour's cost small)."""
    import time

    from tests.conftest import unwritable_folder

    (tmp_path / "a.csv").write_text("videoid,page_dir,name\n1,p,a red square moves left\n2,p,a cat\n")
    out = unwritable_folder(tmp_path) / "tiny"
    llm = ["tiny-llm", "--annotations", str(tmp_path / "a.csv"), "--steps", "3"]
    cases = [
        (["tiny-encoder", "--steps", "3", "--output", str(out)], f"output: cannot write in {str(out)!r}"),
        ([*llm, "--output", str(out)], f"output: cannot write in {str(out)!r}"),
        (["tiny-encoder", "--output", str(tmp_path / "e"), "lr=-1"], "lr must be a finite number > 0"),
        (["tiny-encoder", "--output", str(tmp_path / "e"), "lr=nan"], "lr must be a finite number > 0"),
        ([*llm, "--output", str(tmp_path / "l"), "lr=-1"], "lr must be a finite number > 0 (got -1.0)"),
    ]
    # side by side: each case is mostly its interpreter's start-up (torch, transformers), 7 s on its own
    t0 = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        (
            args,
            says,
            subprocess.Popen(
                [sys.executable, "cli.py", *args],
                cwd=REPO,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        )
        for args, says in cases
    ]
    for args, says, proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1 and stderr.startswith("Error: ") and says in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert time.monotonic() - t0 < 120  # a case that trained before failing would take minutes
    assert not (tmp_path / "e").exists() and not (tmp_path / "l").exists()


def test_read_factors_reads_two_word_shapes():
    assert grounded.read_factors("a green wide bar moves up") == {
        "colour": "green",
        "shape": "wide bar",
        "direction": "up",
    }
    assert grounded.read_factors("a red bar moves left")["shape"] is None  # neither wide nor tall


def _centres(frames, colour):
    out = []
    for f in frames:
        ys, xs = np.nonzero((f == np.array(grounded.COLOURS[colour])).all(-1))
        out.append((xs.mean(), ys.mean(), np.ptp(xs) + 1, np.ptp(ys) + 1))
    return np.array(out)


@pytest.mark.parametrize("shape", ["wide bar", "tall bar"])
def test_bars_have_their_aspect_and_speed_sets_the_travel(shape):
    settings = GroundedSettings(shapes=("square", shape), size=(120, 120), bar_aspect=(3, 3), speed=(20, 20))
    clip = GroundedClip("1", "p", "red", shape, "right", "seen", 6.0, seed=3)
    frames = [f.copy() for f in grounded_frames(clip, 150, 596, 336, settings)(0, 150)]
    (x0, _, w, h), (x1, *_) = _centres([frames[0], frames[-1]], "red")
    assert (w, h) == ((120, 40) if shape == "wide bar" else (40, 120))
    assert abs((x1 - x0) - 20 * 6.0) <= 1  # 20 px/s for 6 s


def test_every_variant_is_valid_and_three_are_held_out():
    roles = [role for role, _, _ in VARIANTS.values()]
    assert roles.count("held-out") >= 3 and roles.count("development") >= 1
    assert len({seed for *_, seed in VARIANTS.values()}) == len(VARIANTS)
    for _, settings, seed in VARIANTS.values():
        settings.validate()
        plan = plan_grounded(settings, seed)
        train = {(c.colour, c.shape, c.direction) for c in plan["train"]}
        novel = {(c.colour, c.shape, c.direction) for c in plan["heldout"] if c.combination == "novel"}
        assert {c.shape for c in plan["train"]} == set(settings.shapes) and not train & novel
        assert novel == set(grounded.novel(settings.shapes))
    independent = plan_grounded(VARIANTS["independent"][1], 0)  # issue 20's corpus: 6 + 1 per triple
    assert len(independent["train"]) == 45 * 6 and {c.shape for c in independent["train"]} == {
        "square",
        "wide bar",
        "tall bar",
    }


def test_bad_settings_are_refused_in_one_line():
    for bad in (
        GroundedSettings(shapes=("square", "hexagon")),
        GroundedSettings(background="stripes"),
        GroundedSettings(speed=(30, 10)),
    ):
        with pytest.raises(ValueError, match="shapes|background|speed"):
            bad.validate()


def test_make_sample_refuses_an_unknown_variant_or_setting_in_one_line(tmp_path):
    for args in (["--variant", "nope"], ["--setting", "background=stripes"], ["--setting", "speeds=[1,2]"]):
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "cli.py"),
                "make-sample",
                "--grounded",
                "--output",
                str(tmp_path),
                *args,
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and (
            "variant" in r.stderr or "background" in r.stderr or "speeds" in r.stderr
        ), r.stderr
