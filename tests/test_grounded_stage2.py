"""Stage 2 on the grounded corpus: its VideoChat conversations, preprocessed by the real job, and the
per-question answer scoring of ``grounded-eval --questions``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from infer.grounded import answer_accuracy
from pipeline import grounded
from standins.sample_data import FAULTY_IDS, GroundedSettings, make_grounded_sample


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small clips (2 s, 8 fps, 96x64): the conversations and the accounting are what is checked here."""
    root = tmp_path_factory.mktemp("grounded_s2")
    small = GroundedSettings(
        per_combination=1, heldout_per_combination=0, novel_per_combination=1, seconds=(2.0, 2.0)
    )
    return make_grounded_sample(root, small, width=96, height=64, fps=8, faults=True, workers=1)


def _rows(corpus, split: str) -> list[dict[str, str]]:
    return list(csv.DictReader((Path(corpus[split]) / "0.csv").open()))


def test_videochat_conversations_ask_every_question_about_every_clip(corpus):
    records = json.loads(Path(corpus["train_videochat"]).read_text())
    rows = [r for r in _rows(corpus, "train") if r["colour"]]
    assert [r["video"] for r in records] == [f"{r['page_dir']}/{r['videoid']}.mp4" for r in rows] + [
        f"{rows[0]['page_dir']}/{vid}.mp4" for vid in FAULTY_IDS
    ]
    firsts = []
    for rec, row in zip(records, rows, strict=False):
        truth = (row["colour"], row["shape"], row["direction"])
        assert sorted(qa["q"] for qa in rec["QA"]) == sorted(grounded.QUESTIONS.values())
        for kind, question in grounded.QUESTIONS.items():
            (answer,) = [qa["a"] for qa in rec["QA"] if qa["q"] == question]
            assert answer == (row["name"] if kind == "caption" else row[kind])
            assert answer == grounded.answer(kind, *truth)
        firsts.append(rec["QA"][0]["q"])
    assert set(firsts) == set(grounded.QUESTIONS.values())  # every kind is also asked first
    held = json.loads(Path(corpus["heldout_videochat"]).read_text())
    assert len(held) == len(_rows(corpus, "heldout")) == 4  # no faulty rows in the held-out split


def test_preprocess_videochat_accounts_for_every_record(ray_local, corpus, tmp_path):
    from pipeline.config import load_config
    from pipeline.shards import list_shards, read_shard
    from preprocess.config import PreprocessConfig
    from preprocess.job import run

    cfg = load_config(
        PreprocessConfig,
        values={
            "dataset": "videochat",
            "annotations": corpus["train_videochat"],
            "videos": corpus["videos"],
            "output": str(tmp_path / "s2"),
            "samples_per_shard": 16,
            "features.enabled": True,
            "features.model": "tiny",
        },
    )
    summary = run(cfg)
    assert (summary["total"], summary["ok"], summary["failed"]) == (47, 44, 3)
    assert summary["failures"] == {"missing_file": 1, "empty_file": 1, "decode_error": 1}
    records = {r["video"]: r["QA"] for r in json.loads(Path(corpus["train_videochat"]).read_text())}
    samples = [s for p in list_shards(tmp_path / "s2") for s in read_shard(p)]
    assert len(samples) == 44
    for s in samples:
        turns = s["meta"]["conversations"]
        qa = records[s["meta"]["videoid"]]
        assert [t["value"] for t in turns] == [x for pair in qa for x in (pair["q"], pair["a"])]
        assert s["features"].shape[:2] == (8, 32) and len(s["meta"]["timestamps"]) == 8


def test_answers_are_scored_by_the_factor_asked_for():
    refs = ["a red square moves left", "a blue circle moves up", "a green triangle moves down"]
    assert answer_accuracy("colour", refs, ["red", "the shape is blue", "red"]) == pytest.approx(2 / 3)
    assert answer_accuracy("shape", refs, ["square", "circle", "a green square"]) == pytest.approx(2 / 3)
    assert answer_accuracy("direction", refs, ["left", "down", "down"]) == pytest.approx(2 / 3)
    assert answer_accuracy("caption", refs, [refs[0], "a blue circle moves down", refs[2]]) == pytest.approx(
        2 / 3
    )
    assert answer_accuracy("colour", refs, ["reds", "", "greenish"]) == 0.0


@pytest.mark.slow
def test_questions_are_asked_as_chat_asks_them_and_scored_from_the_answers():
    """grounded-eval --questions: each answer is what a fresh chat about the clip answers (greedy), and
    the accuracies are the scoring of those answers (here a random tiny model: the mechanics, not learning)."""
    import numpy as np
    import torch

    from infer.grounded import GroundedEvalConfig, evaluate_questions
    from infer.load import Loaded
    from pipeline.generate import GenerationConfig, generate
    from pipeline.model import VideoLLaMA, tiny
    from pipeline.prompts import conversation_prompt, frame_times_message, prepare_tokenizer
    from pipeline.tiny import tiny_tokenizer

    torch.manual_seed(0)
    model, tok = VideoLLaMA(tiny()).eval(), tiny_tokenizer()
    prepare_tokenizer(tok)
    loaded = Loaded(model, tok, torch.device("cpu"), None)
    rng = np.random.default_rng(0)
    triples = [grounded.NOVEL[0], ("blue", "square", "left"), ("green", "triangle", "down")]
    samples = [
        {
            "key": f"{i:09d}",
            "caption": grounded.caption(*t),
            "meta": {"timestamps": [round(0.7 * k + 0.1 * i, 2) for k in range(8)]},
            "features": rng.normal(size=(8, 32, 64)).astype(np.float16),
        }
        for i, t in enumerate(triples)
    ]
    cfg = GroundedEvalConfig(shards="unused", questions="llama2", max_new_tokens=6, batch_size=2)
    report, records = evaluate_questions(loaded, samples, cfg)
    assert report["clips"] == 3 and list(report["questions"]) == list(grounded.QUESTIONS)
    greedy = GenerationConfig(template="llama2", do_sample=False, max_new_tokens=6)
    for s, rec in zip(samples, records, strict=True):
        feats = torch.from_numpy(s["features"]).float()[None]
        message = frame_times_message(s["meta"]["timestamps"])
        for kind, question in grounded.QUESTIONS.items():
            prompt = conversation_prompt(tok, [], question, "llama2", message, 32)
            assert rec[kind] == generate(model, tok, feats, [prompt], greedy)[0]
    refs = [s["caption"] for s in samples]
    for kind, a in report["questions"].items():
        assert a["all"] == answer_accuracy(kind, refs, [r[kind] for r in records])
        assert a["novel"] == answer_accuracy(kind, refs[:1], [records[0][kind]])
        assert 0.0 <= a["shuffled"] <= 1.0 and a["shuffled_chance"] == 0.0  # the 3 triples share no value
