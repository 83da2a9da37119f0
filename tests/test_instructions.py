"""Stage-2 instruction sets through the same preprocessing job: images, conversations, bad records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.shards import list_shards, read_shard
from preprocess.config import PreprocessConfig
from preprocess.job import run
from standins.sample_data import write_clip


def save_image(path: Path, w: int, h: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return arr


def cfg_for(tmp: Path, **values) -> PreprocessConfig:
    return load_config(
        PreprocessConfig, values={"output": str(tmp / "out"), "size": 32, "samples_per_shard": 2, **values}
    )


def statuses(out: Path) -> list[str]:
    return [
        r["status"] if r["status"] == "ok" else r["reason"]
        for r in pq.read_table(out / "index.parquet").to_pylist()
    ]


def test_cc_sbu_align_images(ray_local, tmp_path):
    img = tmp_path / "image"
    img.mkdir()
    save_image(img / "1.jpg", 64, 48, 0)
    save_image(img / "2.jpg", 40, 80, 1)
    (img / "3.jpg").write_bytes((img / "1.jpg").read_bytes()[:100])  # truncated JPEG
    anns = {
        "annotations": [
            {"image_id": "1", "caption": "A Red (square)."},
            {"image_id": "2", "caption": "Blue."},
            {"image_id": "3", "caption": "broken"},
            {"image_id": "4", "caption": "missing file"},
            {"caption": "no image id"},
            {"image_id": "2", "caption": ""},
        ]
    }
    (tmp_path / "filter_cap.json").write_text(json.dumps(anns))
    cfg = cfg_for(
        tmp_path, dataset="cc_sbu_align", annotations=str(tmp_path / "filter_cap.json"), images=str(img)
    )
    summary = run(cfg)
    assert statuses(tmp_path / "out") == [
        "ok",
        "ok",
        "bad_image",
        "missing_file",
        "malformed_record",
        "missing_caption",
    ]
    assert (summary["ok"], summary["failed"]) == (2, 4)
    samples = [s for p in list_shards(tmp_path / "out") for s in read_shard(p)]
    assert [s["caption"] for s in samples] == ["a red square", "blue"]
    expected = np.asarray(Image.open(img / "1.jpg").convert("RGB").resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(samples[0]["frames"], expected[None])


def test_llava_conversations(ray_local, tmp_path):
    img = tmp_path / "coco"
    img.mkdir()
    save_image(img / "a.jpg", 50, 50, 2)
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."}]
    records = [
        {"id": "x1", "image": "a.jpg", "conversations": conv},
        {"id": "x2", "image": "a.jpg", "conversations": [conv[1], conv[0]]},  # starts with gpt
        {"id": "x3", "image": "../escape.jpg", "conversations": conv},
        {"id": "x4", "conversations": conv},
        "not a record",
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    run(cfg_for(tmp_path, dataset="llava", annotations=str(tmp_path / "llava.json"), images=str(img)))
    assert statuses(tmp_path / "out") == [
        "ok",
        "malformed_record",
        "path_escape",
        "malformed_record",
        "malformed_record",
    ]
    (s,) = [s for p in list_shards(tmp_path / "out") for s in read_shard(p)]
    assert s["meta"]["conversations"] == conv and s["frames"].shape == (1, 32, 32, 3)


def test_videochat_qa(ray_local, tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    write_clip(vids / "v1.mp4", 1.2, width=96, height=64, fps=10)
    records = [
        {"video": "v1.mp4", "QA": [{"q": "What moves?", "a": "A box."}, {"q": "Colour?", "a": "Red."}]},
        {"video": "v1.mp4", "QA": []},
        {"video": "gone.mp4", "QA": [{"q": "?", "a": "!"}]},
    ]
    (tmp_path / "vc.json").write_text(json.dumps(records))
    run(cfg_for(tmp_path, dataset="videochat", annotations=str(tmp_path / "vc.json"), videos=str(vids)))
    assert statuses(tmp_path / "out") == ["ok", "malformed_record", "missing_file"]
    (s,) = [s for p in list_shards(tmp_path / "out") for s in read_shard(p)]
    assert s["frames"].shape == (8, 32, 32, 3) and len(s["meta"]["timestamps"]) == 8
    assert [t["from"] for t in s["meta"]["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert s["meta"]["conversations"][3]["value"] == "Red."


def test_instruction_input_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "img").mkdir()
    with pytest.raises(ConfigError, match="not valid JSON"):
        run(
            cfg_for(
                tmp_path,
                dataset="llava",
                annotations=str(tmp_path / "bad.json"),
                images=str(tmp_path / "img"),
            )
        )
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ConfigError, match="'annotations' list"):
        run(
            cfg_for(
                tmp_path,
                dataset="cc_sbu_align",
                annotations=str(tmp_path / "obj.json"),
                images=str(tmp_path / "img"),
            )
        )
    with pytest.raises(ConfigError, match="--images"):
        cfg_for(tmp_path, dataset="llava", annotations=str(tmp_path / "obj.json"), videos=str(tmp_path))
