"""The grounded sample corpus and the corpus-trained tiny LLM (cli.py make-sample --grounded, tiny-llm)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import grounded
from standins.sample_data import GroundedClip, grounded_frames, make_grounded_sample, plan_grounded

REPO = Path(__file__).resolve().parents[1]


def test_plan_holds_every_seen_triple_and_keeps_the_novel_ones_out_of_training():
    plan = plan_grounded(6, 1, 3, seed=0, seconds=(5.0, 7.0))
    train = [(c.colour, c.shape, c.direction) for c in plan["train"]]
    held = plan["heldout"]
    assert len(train) == 44 * 6 and len(held) == 44 + 4 * 3
    assert not set(grounded.NOVEL) & set(train)
    assert {t: train.count(t) for t in set(train)} == {
        t: 6 for t in grounded.combinations() if t not in grounded.NOVEL
    }
    assert sorted({(c.colour, c.shape, c.direction) for c in held if c.combination == "novel"}) == sorted(
        grounded.NOVEL
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
    """Small clips (the layout, columns and faulty rows are what this checks; sizes are the default's)."""
    paths = make_grounded_sample(
        tmp_path, 1, heldout_per_combination=0, novel_per_combination=1, seconds=(1.0, 1.0),
        width=96, height=64, fps=4, faults=True, workers=1,
    )  # fmt: skip
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
