"""Every shipped YAML under configs/ loads into its stage's typed config (found by glob, not by a list)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def config_class(path: Path):
    from preprocess.config import PreprocessConfig
    from train.config import TrainConfig

    for prefix, cls in (("stage1", TrainConfig), ("stage2", TrainConfig), ("preprocess", PreprocessConfig)):
        if path.name.startswith(prefix):
            return cls
    pytest.fail(f"{path.name}: no typed config for this file name; add its prefix to tests/test_configs.py")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "cli.py" in first, (
        f"{path.name} must start with the command that runs it"
    )
    load_config(config_class(path), path)  # nested configs (the model) are checked as they load


def test_real_size_stage1_mirrors_the_original_recipe():
    from train.config import TrainConfig
    from train.engine import lr_at

    cfg = load_config(TrainConfig, [p for p in CONFIGS if p.name == "stage1_vit-g_7b.yaml"][0])
    o = cfg.optim
    assert (cfg.micro_batch, cfg.epochs, cfg.steps_per_epoch, cfg.data.max_caption_tokens) == (
        32,
        5,
        2500,
        32,
    )
    assert (o.warmup_lr, o.init_lr, o.min_lr, o.warmup_steps, o.weight_decay) == (
        1e-6,
        1e-4,
        8e-5,
        2500,
        0.05,
    )
    assert o.grad_clip == 0.0  # the original clips nothing
    # the schedule at its borders, by hand: S = 5 x 2500 iterations, the cosine counts from step 0
    assert lr_at(0, o, 12500) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(2499, o, 12500) == pytest.approx(9.99604e-5, rel=1e-12)  # 1e-6 + 9.9e-5 * 2499/2500
    # 8e-5 + 1e-5 * (1 + cos(pi/5)), cos(pi/5) = 0.80901699437494742
    assert lr_at(2500, o, 12500) == pytest.approx(9.8090169943749474e-5, rel=1e-12)
    # 8e-5 + 1e-5 * (1 - cos(pi/12500)) ~ 8e-5 + 1e-5 * (pi/12500)^2 / 2 = 8e-5 + 3.1582734e-13
    assert lr_at(12499, o, 12500) == pytest.approx(8.00000003158273e-5, rel=1e-14)
    m = cfg.model
    assert (m.vision_layers, m.llm_hidden_size, m.feature_dim) == (39, 4096, 768)


def test_real_size_stage2_mirrors_the_original_recipe():
    from train.config import TrainConfig
    from train.engine import lr_at

    cfg = load_config(TrainConfig, [p for p in CONFIGS if p.name == "stage2_vit-g_7b.yaml"][0])
    o, d = cfg.optim, cfg.data
    assert (cfg.micro_batch, cfg.epochs, cfg.steps_per_epoch) == (4, 3, 1000)
    assert (d.task, d.template, d.max_caption_tokens, d.max_len) == ("conversation", "vicuna", 320, 512)
    assert (o.warmup_lr, o.init_lr, o.min_lr, o.warmup_steps, o.weight_decay) == (
        1e-6,
        3e-5,
        1e-5,
        1000,
        0.05,
    )
    assert o.grad_clip == 0.0  # the original clips nothing
    assert lr_at(0, o, 3000) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(999, o, 3000) == pytest.approx(2.9971e-5, rel=1e-12)  # 1e-6 + 2.9e-5 * 999/1000
    assert lr_at(1000, o, 3000) == pytest.approx(2.5e-5, rel=1e-12)  # 1e-5 + 1e-5 * (1 + cos(pi/3))
    # 1e-5 + 1e-5 * (1 - cos(pi/3000)), 1 - cos(x) = x^2/2 - x^4/24 = 5.4831130550e-7
    assert lr_at(2999, o, 3000) == pytest.approx(1.0000005483113055e-5, rel=1e-14)
    # the original mixes its three instruction sets uniformly; images are 1-frame clips
    assert [(s.weight, s.num_frames) for s in d.specs()] == [(1, 1), (1, 1), (1, 8)]
    assert cfg.init_from and cfg.model.llm_path == "models/vicuna-7b"


@pytest.mark.parametrize("name", ["stage1_vit-g_7b.yaml", "stage2_vit-g_7b.yaml"])
def test_one_shard_folder_on_the_command_line_replaces_a_configs_datasets(name):
    """The real-size configs list data.datasets; the error for data.shards alone names the override."""
    from pipeline.config import ConfigError
    from train.config import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / name
    with pytest.raises(ConfigError, match=r"data\.datasets=\[\] data\.shards=DIR"):
        load_config(TrainConfig, path, ["data.shards=my/shards"])
    cfg = load_config(TrainConfig, path, ["data.datasets=[]", "data.shards=my/shards"])
    assert [s.shards for s in cfg.data.specs()] == ["my/shards"]
