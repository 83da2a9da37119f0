"""Stage 2 end to end on CPU: instruction sets preprocessed by the real job, batches from the real training
stream checked token by token for both templates, too-long conversations skipped and counted, and a
stage-2 run started from a stage-1 export."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.config import ConfigError, load_config
from pipeline.model import VideoLLaMA, tiny
from pipeline.prompts import IGNORE_INDEX, IMAGE_PATCH_TOKEN, conversation_sample, prepare_tokenizer
from pipeline.shards import inspect_shards, list_shards, read_shard
from pipeline.tiny import tiny_tokenizer
from pipeline.weights import load_trainable
from standins.sample_data import write_clip
from tests.conftest import REPO, losses, run_train
from tests.test_prompts import expected
from train.config import TrainConfig
from train.data import CAPTION_INSTRUCTIONS, TrainStream, make_loader, shard_counts
from train.engine import build_model, weights_checksum

STAGE2_TINY = REPO / "configs" / "stage2_tiny.yaml"
IMG = IMAGE_PATCH_TOKEN * 32
SYS = "<<SYS>>\n \n<</SYS>>\n\n"
LONG_QUESTION = " ".join(
    "".join(np.random.default_rng(i).choice(list(string.ascii_lowercase), 6)) for i in range(500)
)  # 3,500 characters: no tokenizer here fits it into 512 tokens


def _image(path: Path, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


@pytest.fixture(scope="module")
def instruct(ray_local, tmp_path_factory) -> dict[str, Path]:
    """cc_sbu_align, LLaVA-Instruct and VideoChat sets (4 records each) -> 56 px shards of 2, by the real job."""
    from preprocess.config import PreprocessConfig
    from preprocess.job import run

    root = tmp_path_factory.mktemp("stage2_data")
    images, videos = root / "images", root / "videos"
    images.mkdir()
    videos.mkdir()
    for i in range(4):
        _image(images / f"{i}.jpg", seed=i)
        write_clip(videos / f"v{i}.mp4", 1.0 + 0.3 * i, width=96, height=64, fps=10, seed=i)
    sets = {
        "cc_sbu_align": {
            "annotations": [
                {"image_id": str(i), "caption": f"Image {i} shows Noise; colours (red, green) everywhere."}
                for i in range(4)
            ]
        },
        "llava": [
            {
                "id": f"l{i}",
                "image": f"{i}.jpg",
                "conversations": [
                    {
                        "from": "human",
                        "value": f"What is in picture {i}?\n<image>" if i % 2 else "<image>\nWhat?",
                    },
                    {"from": "gpt", "value": f"Noise number {i}."},
                    {"from": "human", "value": "Any colour?"},
                    {"from": "gpt", "value": "Many colours."},
                ],
            }
            for i in range(4)
        ],
        "videochat": [
            {"video": "v0.mp4", "QA": [{"q": LONG_QUESTION, "a": "Too long."}]},
            *[
                {
                    "video": f"v{i}.mp4",
                    "QA": [{"q": f"What moves in {i}?", "a": "A box."}, {"q": "Then?", "a": "Red."}],
                }
                for i in range(1, 4)
            ],
        ],
    }
    out = {}
    for name, data in sets.items():
        (root / f"{name}.json").write_text(json.dumps(data))
        cfg = PreprocessConfig(
            dataset=name,
            annotations=str(root / f"{name}.json"),
            images=str(images) if name != "videochat" else None,
            videos=str(videos) if name == "videochat" else None,
            output=str(root / name),
            size=tiny().image_size,
            samples_per_shard=2,
            workers=2,
        )
        assert run(cfg)["ok"] == 4, name
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def char_tok():
    """One token per character (as in tests/test_prompts.py), so expected ids come straight from text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    prepare_tokenizer(hf)
    return hf


def stream(datasets, tok, template="vicuna", micro_batch=2, rank=0, world_size=1, **kw):
    return TrainStream(
        [(shard_counts(folder), w) for folder, w in datasets],
        kind="frames",
        tokenizer=tok,
        mcfg=tiny(),
        micro_batch=micro_batch,
        max_caption_tokens=kw.pop("max_caption_tokens", 320),
        rank=rank,
        world_size=world_size,
        seed=5,
        task="conversation",
        template=template,
        **kw,
    )


def take(s: TrainStream, n: int) -> list[dict]:
    it = iter(make_loader(s, 0, 2))
    return [next(it) for _ in range(n)]


def samples_of(folder: Path) -> list[dict]:
    return [s for p in list_shards(folder) for s in read_shard(p)]


def source_of(frames: torch.Tensor, folder: Path) -> dict:
    """The shard sample a batch row came from, found by its pixels (so text and frames must agree)."""
    (hit,) = [s for s in samples_of(folder) if np.array_equal(s["frames"], frames.numpy())]
    return hit


def segments(template: str, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The spec of REFERENCE.md "Prompts and labels", written out: (text, supervised)."""
    out = []
    for i, (q, a) in enumerate(turns):
        if template == "vicuna":
            out += [
                (("\n\n###" if i == 0 else "") + f"Human: {q}\n###Assistant: ", False),
                (f"{a}\n###", True),
            ]
        else:
            out += [
                (("" if i == 0 else "<s>") + "[INST] " + (SYS if i == 0 else "") + f"{q} [/INST] ", False)
            ]
            out += [(f"{a} </s>", True)]
    return out


def check_rows(batch: dict, tok, template: str, folder: Path, first_question) -> list[str]:
    """Every row's ids and labels equal the template text; returns what filled the first question."""
    seen = []
    for row in range(batch["input_ids"].shape[0]):
        sample = source_of(batch["frames"][row], folder)
        n = int(batch["attention_mask"][row].sum())
        got_ids, got_labels = batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == 0).all()
        matches = []
        for q0, turns in first_question(sample):
            ids, labels = expected(tok, segments(template, [(q0, turns[0][1]), *turns[1:]]))
            if ids == got_ids:
                assert labels == got_labels
                matches.append(q0)
        assert len(matches) == 1, (tok.decode(got_ids), sample["meta"])
        positions = torch.nonzero(batch["video_mask"][row]).flatten().tolist()
        image_id = tok.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
        assert positions == [i for i, t in enumerate(got_ids) if t == image_id] and len(positions) == 32
        assert positions == list(range(positions[0], positions[0] + 32))
        seen.append(matches[0])
    return seen


# the original's stage-2 cc_sbu_align form (video_llama.py prompt_wrap): prompt template and end string
CAPTION_FORM = {
    "vicuna": ("###Human: <Image>", "</Image> {} ###Assistant: ", "###"),
    "llama2": ("[INST] " + SYS + "<Image>", "</Image> {} [/INST] ", "</s>"),
}


def check_caption_rows(batch: dict, tok, template: str, folder: Path) -> list[str]:
    """Every row is [BOS] before <video> after caption+end, only caption+end supervised; returns the
    instruction each row was asked."""
    before, after, end = CAPTION_FORM[template]
    seen = []
    for row in range(batch["input_ids"].shape[0]):
        caption = source_of(batch["frames"][row], folder)["meta"]["caption_raw"]  # raw, as the original
        n = int(batch["attention_mask"][row].sum())
        got = batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist()
        hits = [
            q
            for q in CAPTION_INSTRUCTIONS["image"]
            if expected(tok, [(before + IMG + after.format(q), False), (caption + end, True)]) == got
        ]
        assert len(hits) == 1, tok.decode(got[0])
        seen.append(hits[0])
    return seen


def pairs(meta) -> list[tuple[str, str]]:
    c = meta["conversations"]
    return [(c[i]["value"], c[i + 1]["value"]) for i in range(0, len(c), 2)]


# ---- the data path, token by token --------------------------------------------------------------------


@pytest.mark.parametrize("template", ["vicuna", "llama2"])
def test_videochat_batches_token_by_token(instruct, char_tok, template):
    def first(sample):
        stamps = ", ".join(str(round(t, 1)) for t in sample["meta"]["timestamps"])
        turns = pairs(sample["meta"])
        msg = f"The video contains 8 frames sampled at {stamps} seconds. "
        yield f"<Video>{IMG}</Video> {msg}{turns[0][0]}", turns

    batches = take(stream([(instruct["videochat"], 1)], char_tok, template, label_mask="answers"), 4)
    for b in batches:
        assert b["frames"].shape == (2, 8, 56, 56, 3)
        check_rows(b, char_tok, template, instruct["videochat"], first)
    # the default, data.label_mask=original: the original's masks (pinned by hand in
    # tests/test_original_labels.py) for each row's own turns and frame times. It keeps the too-long
    # question, cut at max_len, as the original did: its "###" after the header is still supervised.
    kept = take(stream([(instruct["videochat"], 1)], char_tok, template), 4)
    for b in kept:
        for row in range(2):
            sample = source_of(b["frames"][row], instruct["videochat"])
            ((q0, turns),) = first(sample)
            msg = q0[len(f"<Video>{IMG}</Video> ") : -len(turns[0][0])]
            want = conversation_sample(char_tok, turns, template, "video", msg)
            n = len(want.input_ids)
            assert b["input_ids"][row, :n].tolist() == want.input_ids
            assert b["labels"][row].tolist() == want.labels + [IGNORE_INDEX] * (b["labels"].shape[1] - n)
    # LLaMA-2 has nothing supervised before the question: skipped (at its 2 visits in 8 positions over 4
    # samples, and whenever a spare draw picks it again)
    too_long = sum(b["too_long"] for b in kept)
    assert too_long == 0 if template == "vicuna" else too_long >= 2
    stamps = samples_of(instruct["videochat"])[1]["meta"]["timestamps"]
    assert len(stamps) == 8 and stamps[0] == 0.0 and stamps[-1] > 0.5  # real decoder timestamps
    assert sum(b["too_long"] for b in batches) >= 1  # the 3,500-character question never fits 512


@pytest.mark.parametrize("template", ["vicuna", "llama2"])
def test_image_batches_token_by_token(instruct, char_tok, template):
    def llava_first(sample):
        turns = pairs(sample["meta"])
        yield turns[0][0].replace("<image>", f"<Image>{IMG}</Image>"), turns

    for b in take(stream([(instruct["llava"], 1)], char_tok, template, label_mask="answers"), 3):
        assert b["frames"].shape == (2, 1, 56, 56, 3) and b["errors"] == b["too_long"] == 0
        check_rows(b, char_tok, template, instruct["llava"], llava_first)
    asked = []
    for b in take(stream([(instruct["cc_sbu_align"], 1)], char_tok, template), 6):
        asked += check_caption_rows(b, char_tok, template, instruct["cc_sbu_align"])
    assert len(set(asked)) > 1  # instructions drawn by the seeded RNG, not one fixed prompt

    # caption + end are cut to max_caption_tokens (here 12 characters), never the prompt
    (b,) = take(stream([(instruct["cc_sbu_align"], 1)], char_tok, template, max_caption_tokens=12), 1)
    caption = source_of(b["frames"][0], instruct["cc_sbu_align"])["meta"]["caption_raw"]
    sup = [t for t in b["labels"][0].tolist() if t != IGNORE_INDEX]
    assert sup == expected(char_tok, [(caption[:12], True)])[0][1:]


def test_too_long_is_skipped_counted_and_resumes_exactly(instruct, char_tok):
    """With label_mask=answers a question cut before its answer leaves nothing to learn: skipped."""
    full = take(stream([(instruct["videochat"], 1)], char_tok, micro_batch=1, label_mask="answers"), 8)
    assert all(b["input_ids"].shape[0] == 1 for b in full)
    skips = [b["too_long"] for b in full]
    long_video = samples_of(instruct["videochat"])[0]["frames"]
    assert all(not np.array_equal(b["frames"][0].numpy(), long_video) for b in full)
    assert sum(skips) >= 2 and [b["step"] for b in full] == list(range(8))
    # restart at step 3 from its global position (3 positions consumed; spares do not move it): the same
    # batches and the same skips follow
    rest = take(
        stream(
            [(instruct["videochat"], 1)],
            char_tok,
            micro_batch=1,
            start_step=3,
            consumed=[3],
            label_mask="answers",
        ),
        5,
    )
    for a, b in zip(full[3:], rest, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["frames"], b["frames"])
        assert (a["too_long"], a["keys"], a["step"]) == (b["too_long"], b["keys"], b["step"])
    # two ranks: each still yields full batches whatever it skips (ranks never disagree on batch size)
    for rank in (0, 1):
        got = take(
            stream([(instruct["videochat"], 1)], char_tok, rank=rank, world_size=2, label_mask="answers"), 4
        )
        assert all(b["input_ids"].shape[0] == 2 and b["video_mask"].sum() == 64 for b in got)


def test_mixing_images_and_videos(instruct, char_tok):
    sets = [(instruct["cc_sbu_align"], 1), (instruct["llava"], 1), (instruct["videochat"], 1)]
    got = take(stream(sets, char_tok), 12)
    frames = {b["dataset"]: b["frames"].shape[1] for b in got}
    assert frames == {0: 1, 1: 1, 2: 8}  # each batch from one dataset, its own frame count
    tiny_cfg = tiny()
    assert inspect_shards(instruct["llava"], "auto", 1, tiny_cfg).kind == "frames"
    with pytest.raises(ConfigError, match=r"data.datasets\[1\].num_frames is 8 .* 1 frames .* num_frames: 1"):
        inspect_shards(instruct["llava"], "auto", 8, tiny_cfg, "data.datasets[1].num_frames")
    with pytest.raises(ConfigError, match="data.template"):
        load_config(TrainConfig, STAGE2_TINY, ["data.template=null"])


# ---- stage 1 -> stage 2 -------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage2_starts_from_the_stage1_export(instruct, tmp_path):
    stage1 = tmp_path / "stage1"
    run_train(
        1,
        f"data.shards={instruct['cc_sbu_align']}",  # stage 1 on image captions (1-frame clips)
        "data.num_frames=1",
        f"run_dir={stage1}",
        "max_steps=3",
        "save_every=3",
        "tracking=false",
    )
    export_sd, _ = load_trainable(stage1 / "export")

    stage2 = tmp_path / "stage2"
    mix = ", ".join(
        f"{{shards: {instruct[n]}, weight: 1, num_frames: {f}}}"
        for n, f in (("cc_sbu_align", 1), ("llava", 1), ("videochat", 8))
    )
    # bf16 as on a GPU: DeepSpeed then rebuilds its fp32 master weights from the bf16-cast module, which
    # the loop must undo (train.engine.set_master_weights) for stage 2 to start from the export exactly
    args = [f"init_from={stage1 / 'export'}", f"data.datasets=[{mix}]", f"run_dir={stage2}", "max_steps=6"]
    args.append("data.label_mask=answers")  # skips the too-long question (the original's mask keeps it)
    args += ["precision=bf16", "model.llm_path=null", "micro_batch=2"]  # stage 1's LLM: the built-in one
    cfg = load_config(TrainConfig, STAGE2_TINY, args)
    # step 0 = build_model + the optimizer's fp32 master copy: both hold the stage-1 export, exactly
    model = build_model(cfg, cfg.model)
    trainable = model.trainable_state_dict()
    assert trainable.keys() == export_sd.keys()
    assert all(torch.equal(trainable[k], export_sd[k]) for k in export_sd)
    torch.manual_seed(cfg.seed)
    fresh = VideoLLaMA(tiny()).trainable_state_dict()
    assert not torch.equal(fresh["llama_proj.weight"], export_sd["llama_proj.weight"])

    proc = run_train(1, *args, config=STAGE2_TINY)
    assert "init_from" in proc.stdout and "loaded" in proc.stdout
    started = json.loads((stage2 / "init_from.json").read_text())
    assert started["checksum"] == weights_checksum(export_sd) != weights_checksum(fresh)
    loss = losses(stage2)
    assert sorted(loss) == list(range(1, 7)) and all(math.isfinite(v) for v in loss.values())
    rows = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    # the loop counts what the stream skipped: the same numbers as the stream itself for these batches
    tok = tiny_tokenizer()
    prepare_tokenizer(tok)
    s = TrainStream(
        [(shard_counts(instruct[n]), 1.0) for n in ("cc_sbu_align", "llava", "videochat")],
        kind="frames",
        tokenizer=tok,
        mcfg=tiny(),
        micro_batch=cfg.micro_batch,
        max_caption_tokens=cfg.data.max_caption_tokens,
        rank=0,
        world_size=1,
        seed=cfg.seed,
        task="conversation",
        template="vicuna",
        max_len=cfg.data.max_len,
        label_mask="answers",
    )
    expected_skips = np.cumsum([b["too_long"] for b in take(s, 6)]).tolist()
    assert [r["data_too_long"] for r in rows] == expected_skips and expected_skips[-1] >= 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{stage2 / 'mlflow.db'}")
    run = client.get_run((stage2 / "mlflow_run_id").read_text())
    assert (
        run.data.tags["init_weights_checksum"] == started["checksum"]
        and run.data.tags["task"] == "conversation"
    )
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.value for m in history] == [loss[s] for s in range(1, 7)]
    assert len(client.get_metric_history(run.info.run_id, "data_too_long")) == 6
