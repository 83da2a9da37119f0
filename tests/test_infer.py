"""Inference and evaluation on CPU: a tiny model trained for a few steps on shards made by the real
preprocessing job, then captioned (video files and shards), chatted with, evaluated; error messages."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from infer.batch import BatchCaptionConfig
from infer.batch import run as caption_shards
from infer.caption import read_video
from infer.evaluate import EvaluateConfig
from infer.evaluate import run as evaluate
from infer.load import CheckpointError, ModelSource, locate
from pipeline.evaluation import caption_metrics
from pipeline.generate import GenerationConfig, cut_at_stop, generate
from pipeline.model import VideoLLaMA, tiny
from pipeline.prompts import conversation_prompt, prepare_tokenizer, stage1_prompt
from pipeline.rundir import EVAL
from pipeline.shards import list_shards, read_shard
from pipeline.tiny import tiny_tokenizer
from standins.synthetic import write_tiny_llm
from tests.conftest import BAD_ROWS, REPO, run_train, train_env, unwritable_folder

STEPS = 30


@pytest.fixture(scope="module")
def data(corpus, corpus_shards):
    """6 good clips + one row of every failure class -> webdataset shards of 56 px frames (conftest)."""
    return {"videos": Path(corpus["videos"]) / "000001_000050", "shards": corpus_shards}


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A tiny stage-1 run with validation on the same shards every 10 steps (train.loop's eval hook)."""
    out = tmp_path_factory.mktemp("infer_run") / "run"
    args = [f"data.shards={data['shards']}", f"run_dir={out}", f"max_steps={STEPS}", "save_every=10"]
    args += ["optim.init_lr=5e-3", "data.workers=1", f"eval.shards={data['shards']}", "eval.every=10"]
    run_train(1, *args)
    return out


def _cli(*args: str, input: str | None = None):
    return CliRunner().invoke(cli.main, list(args), input=input)


def _key_of(shards: Path, videoid: str) -> tuple[str, np.ndarray]:
    for path in list_shards(shards):
        for s in read_shard(path):
            if s["meta"]["videoid"] == videoid:
                return s["key"], s["frames"]
    raise KeyError(videoid)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- prompts and generation, no checkpoint -----------------------------------------------------


def test_prompts_end_where_the_answer_starts():
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    image = tok.convert_tokens_to_ids("<ImageHere>")
    p = stage1_prompt(tok, 32)
    assert p.input_ids == [tok.bos_token_id] + [image] * 32 and p.video_positions == list(range(1, 33))
    v = conversation_prompt(tok, [("q1", "a1")], "q2", "vicuna", "The video contains 8 frames. ", 32)
    text = tok.decode(v.input_ids)
    assert text.endswith("###Human: q2\n###Assistant:") and "</Video> The video contains 8 frames. q1" in text
    assert "###Assistant: a1\n" in text and len(v.video_positions) == 32
    ll = tok.decode(conversation_prompt(tok, [], "q", "llama2", "", 32).input_ids)
    assert ll.endswith("q [/INST]") and "<<SYS>>" in ll
    assert cut_at_stop(" a red box\n###Human: x", ["###", "\n"]) == "a red box"


def test_left_padded_batch_generates_what_each_row_does_alone():
    torch.manual_seed(0)
    model = VideoLLaMA(tiny()).eval()
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    feats = torch.randn(2, 8, 32, 64)
    prompts = [stage1_prompt(tok), conversation_prompt(tok, [], "what is it?", "vicuna", "", 32)]
    gen = GenerationConfig(do_sample=False, max_new_tokens=12, stop=[])
    both = generate(model, tok, feats, prompts, gen)
    alone = [generate(model, tok, feats[i : i + 1], prompts[i : i + 1], gen)[0] for i in range(2)]
    assert both == alone and all(both)
    sampled = GenerationConfig(max_new_tokens=12, stop=[], seed=3)  # the original's sampling defaults
    assert generate(model, tok, feats, prompts, sampled) == generate(model, tok, feats, prompts, sampled)


def test_metrics_are_the_libraries_numbers():
    import sacrebleu
    from pycocoevalcap.cider.cider import Cider

    hyp = ["a man is riding a horse on the beach", "two dogs play with a ball", "a red box moves"]
    ref = [
        "a man rides a horse on the beach at sunset",
        "two dogs play with a red ball in the park",
        "a red box moves to the left",
    ]
    got = caption_metrics(hyp, ref)
    assert got["bleu"] == sacrebleu.corpus_bleu(hyp, [ref]).score == pytest.approx(44.2443145491119)
    assert got["chrf"] == sacrebleu.corpus_chrf(hyp, [ref]).score == pytest.approx(55.5287742834193)
    cider = Cider().compute_score({i: [r] for i, r in enumerate(ref)}, {i: [h] for i, h in enumerate(hyp)})[0]
    assert got["cider"] == cider == pytest.approx(5.03235836848398)
    assert got["exact_match"] == 0.0
    assert caption_metrics(ref, ref)["bleu"] == pytest.approx(100.0)
    assert caption_metrics(ref, ref)["exact_match"] == 1.0
    assert caption_metrics([ref[0], hyp[1], ref[2], "x"], [*ref, "y"])["exact_match"] == 0.5


# ---- from a trained checkpoint -----------------------------------------------------------------


def test_checkpoint_argument_resolves_to_the_newest_export(run_dir, tmp_path):
    export, found_run = locate(run_dir)
    assert found_run == run_dir and export in (run_dir / "export", *run_dir.glob("checkpoints/*/export"))
    step_export = sorted(run_dir.glob("checkpoints/step_*/export"))[-1]
    assert locate(step_export) == (step_export, run_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        locate(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a training run directory"):
        locate(tmp_path)


@pytest.mark.slow
def test_greedy_caption_is_deterministic_and_equals_batch_captioning(data, run_dir, tmp_path):
    video = data["videos"] / "10002.mp4"
    args = ["caption", str(run_dir), str(video), "--greedy", "--max-new-tokens", "12"]
    first, second = _cli(*args), _cli(*args)
    assert first.exit_code == 0, first.output
    caption = first.stdout.strip()
    assert caption and second.stdout.strip() == caption and len(first.stdout.splitlines()) == 1

    # the same frames as the preprocessing job stored, so the same caption from the shards
    key, frames = _key_of(data["shards"], "10002")
    assert np.array_equal(read_video(video, 8, tiny().image_size)["frames"], frames)
    out = tmp_path / "captions.jsonl"
    cfg = BatchCaptionConfig(
        model=ModelSource(checkpoint=str(run_dir)),
        generation=GenerationConfig(do_sample=False, max_new_tokens=12),
        shards=str(data["shards"]),
        output=str(out),
    )
    caption_shards(cfg)
    assert {r["key"]: r["caption"] for r in _lines(out)}[key] == caption

    # a released-format .pth of the same weights captions the same (preset + the run's seed given)
    pth = tmp_path / "videollama.pth"
    assert _cli("convert", str(run_dir / "export"), str(pth)).exit_code == 0
    from_pth = _cli("caption", str(pth), str(video), "--greedy", "--max-new-tokens", "12", "--preset", "tiny")
    assert from_pth.exit_code == 0, from_pth.output
    assert from_pth.stdout.strip() == caption


def test_caption_of_several_files_captions_the_readable_ones_and_names_the_bad(data, run_dir, tmp_path):
    """caption a.mp4 bad.mp4 DIR b.mp4 missing.mp4: every readable file captioned (as when captioned
    alone), every other named with its reason, exit status 1."""
    good_a, good_b = str(data["videos"] / "10001.mp4"), str(data["videos"] / "10003.mp4")
    bad, missing = str(data["videos"] / "truncated.mp4"), str(tmp_path / "missing.mp4")
    folder = tmp_path / "a_folder.mp4"
    folder.mkdir()
    gen = ["--greedy", "--max-new-tokens", "6"]
    alone = _cli("caption", str(run_dir), good_a, good_b, *gen)
    assert alone.exit_code == 0, alone.output
    named = dict(line.split("\t") for line in alone.stdout.splitlines())  # VIDEO<TAB>caption
    assert list(named) == [good_a, good_b] and all(named.values())
    one = _cli("caption", str(run_dir), good_b, *gen)  # one video: the bare caption
    assert one.stdout == named[good_b] + "\n"
    r = _cli("caption", str(run_dir), good_a, bad, str(folder), good_b, missing, *gen, "--json")
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["video"] for row in rows] == [good_a, bad, str(folder), good_b, missing]
    assert [row["caption"] for row in rows if "caption" in row] == list(named.values())
    assert [row.get("reason") for row in rows] == [None, "decode_error", "not_a_file", None, "missing_file"]
    errors = r.stderr.splitlines()
    assert len(errors) == 4 and "is a directory, not a video file" in errors[1]
    assert all(e.startswith("Error: ") for e in errors) and "3 of 5 videos" in errors[-1]
    assert all(path in r.stderr for path in (bad, str(folder), missing))
    plain = _cli("caption", str(run_dir), bad, good_b, str(folder), good_a, *gen)
    assert plain.exit_code == 1  # the failed files are named on stderr; no caption moves to their line
    assert plain.stdout.splitlines() == [f"{good_b}\t{named[good_b]}", f"{good_a}\t{named[good_a]}"]


def test_chat_with_empty_stdin_says_so(data, run_dir):
    r = _cli("chat", str(run_dir), str(data["videos"] / "10001.mp4"), "--greedy", input="")
    assert r.exit_code == 1 and "Error: chat: no question on stdin" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_batch_captioning_covers_every_row_once_and_resumes(data, run_dir, tmp_path, capfd):
    out = tmp_path / "captions.jsonl"
    cfg = BatchCaptionConfig(
        model=ModelSource(checkpoint=str(run_dir)),
        generation=GenerationConfig(do_sample=False, max_new_tokens=8, batch_size=3),
        shards=str(data["shards"]),
        output=str(out),
    )
    full = caption_shards(cfg)
    assert "constructor arguments in the object store" not in capfd.readouterr().err
    rows = _lines(out)
    ok_keys = {s["key"] for p in list_shards(data["shards"]) for s in read_shard(p)}
    assert len(ok_keys) == 6 and sorted(r["key"] for r in rows) == sorted(ok_keys)
    assert all(set(r) == {"key", "videoid", "caption", "shard"} for r in rows)
    assert (full["new"], full["failed"], full["preprocess_failed"]) == (6, 0, len(BAD_ROWS))
    assert sum(full["preprocess_reasons"].values()) == len(BAD_ROWS)

    # a run killed after two lines, in the middle of the third
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:15])
    again = caption_shards(cfg)
    rerun = _lines(out)
    assert (again["resumed"], again["new"]) == (2, 4) and rerun[:2] == rows[:2]
    assert sorted(r["key"] for r in rerun) == sorted(ok_keys)  # each key exactly once
    assert {r["key"]: r["caption"] for r in rerun} == {r["key"]: r["caption"] for r in rows}
    done = caption_shards(cfg)
    assert (done["new"], len(_lines(out))) == (0, 6)


def test_evaluate_matches_training_validation_and_logs_to_mlflow(data, run_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    in_training = _lines(run_dir / EVAL)
    assert [r["step"] for r in in_training] == [10, 20, 30]
    cfg = EvaluateConfig(
        model=ModelSource(checkpoint=str(run_dir)),
        generation=GenerationConfig(do_sample=False, max_new_tokens=8),
        shards=str(data["shards"]),
        metrics=True,
        predictions=str(tmp_path / "preds.jsonl"),
        track=str(run_dir),
    )
    got = evaluate(cfg)
    assert got["step"] == STEPS and got["samples"] == 6
    assert got["loss"] == pytest.approx(in_training[-1]["loss"], abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    preds = _lines(tmp_path / "preds.jsonl")
    expect = caption_metrics([p["prediction"] for p in preds], [p["reference"] for p in preds])
    assert {k: got[k] for k in expect} == pytest.approx(expect)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    history = client.get_metric_history(got["mlflow_run_id"], "eval/loss")
    assert [m.step for m in history] == [10, 20, 30, 30] and history[-1].value == pytest.approx(got["loss"])
    exact = client.get_metric_history(got["mlflow_run_id"], "eval/exact_match")
    assert [(m.step, m.value) for m in exact] == [(STEPS, got["exact_match"])]
    assert got["exact_match"] == sum(p["prediction"] == p["reference"] for p in preds) / 6
    assert client.get_run(got["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_chat_answers_every_piped_question(data, run_dir):
    questions = "What is in the video?\nWhat colour is it?\n\nnot asked\n"
    cmd = [sys.executable, str(REPO / "cli.py"), "chat", str(run_dir), str(data["videos"] / "10001.mp4")]
    cmd += ["--greedy", "--max-new-tokens", "8"]
    p = subprocess.run(
        cmd, cwd=REPO, env=train_env(), input=questions, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    answers = [ln for ln in p.stdout.splitlines() if ln.startswith("ASSISTANT:")]
    assert len(answers) == 2, p.stdout


def test_errors_name_the_problem(data, run_dir, tmp_path):
    video = str(data["videos"] / "10002.mp4")
    r = _cli("caption", str(tmp_path / "missing"), video)
    assert r.exit_code == 1 and "Error: checkpoint" in r.output and "does not exist" in r.output
    r = _cli("caption", str(run_dir), str(data["videos"] / "notvideo.mp4"))
    assert r.exit_code == 1 and "Error: video" in r.output and "notvideo.mp4" in r.output
    assert "cannot be decoded" in r.output
    r = _cli("caption", str(run_dir), str(tmp_path / "absent.mp4"))
    assert r.exit_code == 1 and "absent.mp4' does not exist" in r.output
    llm = write_tiny_llm(tmp_path / "llm32", hidden_size=32)
    r = _cli("caption", str(run_dir), video, "--llm", str(llm))
    assert r.exit_code == 1 and "hidden size 32" in r.output and "projects video tokens to 64" in r.output
    r = _cli("evaluate", str(run_dir), str(tmp_path / "noshards"))
    assert r.exit_code == 1 and "noshards" in r.output and "Traceback" not in r.output
    r = _cli("caption", str(run_dir), video, "generation.top_p=2")
    assert r.exit_code == 1 and "top_p" in r.output
    locked = unwritable_folder(tmp_path)
    r = _cli("caption-shards", str(run_dir), str(data["shards"]), "--output", str(locked / "c.jsonl"))
    assert r.exit_code == 1 and "cannot write in" in r.output and "Traceback" not in r.output
