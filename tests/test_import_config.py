"""import-config on the original's own configs (tests/fixtures/original_configs: train_configs/ and
eval_configs/ of DAMO-NLP-SG/Video-LLaMA, the Vicuna files of commit 331451e and the LLaMA-2-era files
of 64888c0, unchanged): the printed config validates, carries the original's numbers, and names every
key it drops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infer.serve import ServeConfig
from pipeline.config import load_config
from pipeline.original_config import import_config, read_original, render
from train.config import TrainConfig, missing_paths

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "original_configs"
STAGE1 = ("video_llama_stage1_pretrain.yaml", "visionbranch_stage1_pretrain.yaml")
STAGE2 = ("video_llama_stage2_finetune.yaml", "visionbranch_stage2_finetune.yaml")


def imported(name: str):
    result = import_config(FIXTURES / name)
    cls = TrainConfig if result.kind == "train" else ServeConfig
    return result, load_config(cls, values=yaml.safe_load(render(result, name)))


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_original_config_imports_and_validates(path):
    result, cfg = imported(path.name)
    assert result.kind == ("eval" if path.parent.name and "eval" in path.name else "train")
    assert any("becomes bf16" in n for n in result.notes) == (result.kind == "train")
    assert any(n.startswith("model.arch:") for n in result.notes)  # every dropped key is named


@pytest.mark.parametrize("name", STAGE1)
def test_stage1_carries_the_original_numbers(name):
    result, cfg = imported(name)
    o = cfg.optim
    assert (o.init_lr, o.min_lr, o.warmup_lr, o.warmup_steps, o.weight_decay) == (
        1e-4,
        8e-5,
        1e-6,
        2500,
        0.05,
    )
    assert (cfg.micro_batch, cfg.epochs, cfg.steps_per_epoch, cfg.seed) == (32, 5, 2500, 42)
    assert cfg.data.task == "caption" and cfg.data.num_frames == 8 and cfg.data.workers == 8
    assert [(d.shards, d.weight, d.num_frames) for d in cfg.data.datasets] == [
        ("data/webvid/shards", 100, 8),
        ("data/cc_sbu_align/shards", 24, 1),
    ]
    assert cfg.model.llm_path == "ckpt/vicuna-13b" and cfg.model_preset == "vit-g-13b"
    assert cfg.model.num_video_query_tokens == 32 and cfg.model.max_frames == 32
    assert cfg.run_dir == "output/videollama_stage1_pretrain" and cfg.precision == "auto"
    assert cfg.init_from is None  # MiniGPT-4's llama_proj is not loaded, and said so
    assert any(n.startswith("model.llama_proj_model:") for n in result.notes)
    assert any("audio branch" in n for n in result.notes)
    assert result.commands[0].startswith(
        "python cli.py preprocess --dataset webvid --annotations path/webvid/webvid_train_data/filter_annotations/"
    )
    # the project's own stage-1 recipe states the same schedule
    shipped = load_config(TrainConfig, REPO / "configs" / "stage1_vit-g_7b.yaml")
    assert (shipped.optim.init_lr, shipped.optim.min_lr, shipped.optim.warmup_steps) == (
        o.init_lr,
        o.min_lr,
        2500,
    )
    assert (shipped.micro_batch, shipped.epochs, shipped.steps_per_epoch) == (32, 5, 2500)


def test_the_vicuna_stage1_file_has_a_typo_that_is_read_and_named():
    result, cfg = imported("video_llama_stage1_pretrain.yaml")
    assert (
        "model.num_video_query_token: '32v' is not a number in the original either: read as 32"
        in result.notes
    )


@pytest.mark.parametrize("name", STAGE2)
def test_stage2_carries_the_original_numbers(name):
    result, cfg = imported(name)
    o = cfg.optim
    assert (o.init_lr, o.min_lr, o.warmup_lr, o.warmup_steps, o.weight_decay) == (
        3e-5,
        1e-5,
        1e-6,
        1000,
        0.05,
    )
    assert (cfg.micro_batch, cfg.epochs, cfg.steps_per_epoch) == (4, 3, 1000)
    assert cfg.data.task == "conversation" and cfg.data.template == "vicuna"  # end_sym "###"
    assert cfg.data.max_caption_tokens == 320 and cfg.init_from == "path/pretrained_ckpt"
    assert [(d.shards, d.weight, d.num_frames) for d in cfg.data.datasets] == [
        ("data/cc_sbu_align/shards", 1, 1),
        ("data/llava_instruct/shards", 1, 1),
        ("data/webvid_instruct/shards", 1, 8),
    ]
    assert "--dataset videochat --annotations path/videochat_instruct_11k.json" in result.commands[2]


def test_the_llama2_era_files_are_repaired_and_the_repairs_named():
    with pytest.raises(yaml.YAMLError):  # as shipped, the file is not YAML
        yaml.safe_load((FIXTURES / "visionbranch_stage2_finetune.yaml").read_text())
    _, notes = read_original(FIXTURES / "visionbranch_stage2_finetune.yaml")
    assert notes[0] == (
        "llama_model: offers ckpt/vicuna-13b/ or ckpt/vicuna-7b/ or ckpt/llama-2-7b-chat-hf or "
        "ckpt/llama-2-13b-chat-hf: took 'ckpt/vicuna-13b/' (line 14)"
    )
    assert "line 51 is indented under a value: read at the indentation of the line above" in notes
    result, _ = imported("visionbranch_stage2_finetune.yaml")
    assert (
        "datasets.webvid_instruct.model_type: 'llama_v2' disagrees with the model's template; took vicuna"
        in (result.notes)
    )


def test_eval_configs_become_serve_configs():
    result, cfg = imported("video_llama_eval.yaml")
    assert cfg.model.checkpoint == "/path/to/pretrained/ckpt/" and cfg.model.llm_path == "ckpt/vicuna-13b"
    assert cfg.generation.template == "vicuna" and cfg.num_frames == 8
    result, cfg = imported("video_llama_eval_withaudio.yaml")
    assert {n.split(":")[0] for n in result.notes if "audio branch" in n} == {
        "model.equip_audio_branch", "model.imagebind_ckpt_path", "model.ckpt_2"
    }  # fmt: skip


def test_the_printed_config_passes_train_dry_run_when_its_paths_exist(tmp_path, monkeypatch):
    """Through the CLI, in a folder where the printed paths are made: the dry run passes; without one of
    them it names it. (The first call in its own interpreter, the dry runs in this one: each
    interpreter start-up costs about 6 s.)"""
    from click.testing import CliRunner

    import cli

    src = FIXTURES / "visionbranch_stage2_finetune.yaml"
    out = tmp_path / "stage2.yaml"
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "import-config", str(src), "--output", str(out)],
                       cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        "[import-config] run.amp: True: fp16 autocast + loss scaling becomes bf16 on GPU (precision: auto)"
        in (r.stderr.splitlines())
    )
    assert "#   torchrun --nproc_per_node=N cli.py train --config THIS_FILE" in out.read_text()
    cfg = load_config(TrainConfig, out)
    missing = missing_paths(cfg)
    assert len(missing) == 7  # llm, 2 encoder files, init_from, 3 shard folders
    for line in missing:
        (tmp_path / line.split("'")[1]).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the printed paths are relative to where the user runs it
    dry = ["train", "--config", str(out), "--dry-run"]
    r = CliRunner().invoke(cli.main, dry)
    assert r.exit_code == 0 and "is valid and every path it names exists" in r.stdout, r.output
    (tmp_path / "data" / "llava_instruct" / "shards").rmdir()
    r = CliRunner().invoke(cli.main, dry)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        "Error: 1 path(s) missing: data.datasets[1].shards: 'data/llava_instruct/shards' does not exist"
    )
