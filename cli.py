"""Command line: maps commands to each stage's ``run(cfg)``; no logic lives here.

python cli.py make-sample --output data/webvid_sample --clips 16
python cli.py preprocess --annotations A --videos V --output OUT [--format arrow] [key=value ...]
python cli.py preprocess --config configs/preprocess.yaml output=OUT
python cli.py train --config configs/stage1_tiny.yaml data.shards=SHARDS run_dir=runs/tiny [key=value ...]
torchrun --nproc_per_node=N cli.py train ...   |   deepspeed --num_gpus N cli.py train ...
"""

from __future__ import annotations

import os
import sys

import click

from pipeline.config import ConfigError, load_config


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--local_rank", "--local-rank", type=int, hidden=True, expose_value=False)  # deepspeed launcher
def main() -> None:
    """Video-LLaMA pipeline: preprocessing, feature cache, training, inference."""


@main.command("make-sample")
@click.option(
    "--output", required=True, type=click.Path(file_okay=False), help="folder for annotations/ and videos/"
)
@click.option("--clips", default=16, show_default=True, help="number of clips")
@click.option("--seed", default=0, show_default=True)
@click.option("--min-seconds", default=5.0, show_default=True)
@click.option("--max-seconds", default=20.0, show_default=True)
@click.option("--tars", is_flag=True, help="write WebDataset tars of videos instead of CSV + folders")
@click.option("--faults", is_flag=True, help="add a missing, an empty and a truncated video row")
def make_sample(
    output: str, clips: int, seed: int, min_seconds: float, max_seconds: float, tars: bool, faults: bool
) -> None:
    """Write a small synthetic WebVid-layout corpus (596x336 H.264 clips with captions)."""
    from pipeline.sample_data import make_webvid_sample, make_webvid_tars

    if tars:
        click.echo(make_webvid_tars(output, clips, seed=seed, seconds=(min_seconds, max_seconds)))
    else:
        paths = make_webvid_sample(
            output, clips, seed=seed, seconds=(min_seconds, max_seconds), faults=faults
        )
        click.echo(f"annotations: {paths['annotations']}\nvideos: {paths['videos']}")


@main.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of PreprocessConfig keys"
)
@click.option("--annotations", help="WebVid CSV/TSV file or folder of them (columns videoid, page_dir, name)")
@click.option("--videos", help="videos folder: VIDEOS/<page_dir>/<videoid>.mp4")
@click.option("--tars", help="instead: folder of WebDataset tars of videos (.mp4 + .json/.txt caption)")
@click.option(
    "--dataset",
    type=click.Choice(["webvid", "cc_sbu_align", "llava", "videochat"]),
    help="what --annotations holds [webvid]; instruction sets are JSON files",
)
@click.option("--images", help="image folder for --dataset cc_sbu_align / llava")
@click.option("--output", help="output shard folder")
@click.option("--format", "fmt", type=click.Choice(["webdataset", "arrow"]), help="shard format [webdataset]")
@click.option("--samples-per-shard", type=int, help="input rows per shard [256]")
@click.option("--num-frames", type=int, help="frames per clip, 1..32 [8]")
@click.option(
    "--sampling", type=click.Choice(["uniform", "headtail", "random"]), help="frame sampler [uniform]"
)
@click.option("--seed", type=int, help="seed of the random samplers [0]")
@click.option("--size", type=int, help="frame size in pixels [224]")
@click.option(
    "--resize", type=click.Choice(["squash", "center_crop"]), help="squash (original) or keep aspect + crop"
)
@click.option("--workers", type=int, help="local Ray CPUs [all cores]")
@click.option("--ray-address", help="join an existing Ray cluster (e.g. 'auto')")
@click.option("--views", type=int, help="sampler draws per clip [1]")
@click.option("--limit", type=int, help="only the first N input rows")
@click.option(
    "--cache-features", is_flag=True, default=None, help="also run the frozen encoder (features.* keys)"
)
@click.option("--encoder", help="encoder preset for --cache-features (vit-g-7b, tiny) [vit-g-7b]")
@click.argument("overrides", nargs=-1)
def preprocess(config_path, overrides, **flags) -> None:
    """Decode, sample and shard WebVid clips with Ray Data (extra args: key=value overrides).

    With --cache-features the frozen ViT + image Q-Former run in a Ray actor pool and the shards also
    hold [T, 32, 768] features; weights from features.blip2_path=DIR or features.eva_vit_path=F
    features.qformer_lavis_path=F.
    """
    from preprocess.config import PreprocessConfig
    from preprocess.job import format_summary, run

    names = {"fmt": "format", "cache_features": "features.enabled", "encoder": "features.model"}
    values = {names.get(k, k): v for k, v in flags.items() if v is not None}
    try:
        cfg = load_config(PreprocessConfig, config_path, list(overrides), values=values)
        summary = run(cfg)
    except ConfigError as e:
        _fail(e)
    click.echo(format_summary(summary))


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
def convert(src: str, dst: str) -> None:
    """Released Video-LLaMA checkpoint (.pth) -> trainable-weights export folder, or back.

    The export is trainable.safetensors + model.yaml; the way back writes {"model": state_dict} with
    the original (LAVIS BERT) key names.
    """
    from pipeline.weights import WeightsError
    from pipeline.weights import convert as convert_weights

    try:
        report = convert_weights(src, dst)
    except (WeightsError, ConfigError) as e:
        _fail(e)
    click.echo(f"{src} -> {dst}\n{report}")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML file")
@click.argument("overrides", nargs=-1)
def train(config_path, overrides) -> None:
    """Stage-1 training with DeepSpeed ZeRO-2 (extra args: key=value overrides, e.g. max_steps=100)."""
    from train.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, config_path, list(overrides))
        from train.loop import run

        summary = run(cfg)
    except ConfigError as e:
        _fail(e)
    click.echo(f"[train] done: {summary}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
