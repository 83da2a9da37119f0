"""apply-delta: FastChat's ``target = base + delta`` on tiny Llamas made here, streamed shard by shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.delta import DeltaError, apply_delta
from pipeline.tiny import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def llama(seed: int, vocab: int, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # norms too: every tensor differs between base and target
    return model


def make_delta(base: LlamaForCausalLM, target: LlamaForCausalLM, out: Path, shard: str) -> None:
    """delta = target - base, with the base's vocabulary tensors taken as zero in added rows."""
    b = base.state_dict()
    delta = {}
    for k, t in target.state_dict().items():
        d = t.clone()
        d[: b[k].shape[0]] -= b[k]
        delta[k] = d
    model = LlamaForCausalLM(target.config)
    model.load_state_dict(delta)
    model.save_pretrained(out, max_shard_size=shard)


def pair(tmp_path: Path, extra_rows: int, shard: str = "100KB") -> dict:
    """A base Llama, a target with ``extra_rows`` more vocabulary rows (a pad token added to the
    tokenizer, as Vicuna v0), and the delta between them, each saved in several shards."""
    tok = tiny_tokenizer()
    vocab = len(tok)
    base, target = llama(0, vocab), llama(1, vocab + extra_rows)
    base.save_pretrained(tmp_path / "base", max_shard_size=shard)
    tok.save_pretrained(tmp_path / "base")
    if extra_rows:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.save_pretrained(tmp_path / "delta")
    make_delta(base, target, tmp_path / "delta", shard)
    return {"target": target, "base_dir": tmp_path / "base", "delta_dir": tmp_path / "delta", "vocab": vocab}


def test_apply_delta_round_trips_with_an_added_pad_row(tmp_path):
    p = pair(tmp_path, extra_rows=1)
    assert len(list(p["delta_dir"].glob("*.safetensors"))) > 2  # several shards, streamed one by one
    report = apply_delta(p["base_dir"], p["delta_dir"], tmp_path / "out")
    assert report.added_rows == dict.fromkeys(VOCAB_TENSORS, 1)
    assert report.shards == len(list(p["delta_dir"].glob("*.safetensors")))
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    want = p["target"].state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    largest = max(t.abs().max().item() for t in want.values())
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-6 * largest, (worst, largest)
    assert got["model.embed_tokens.weight"].shape[0] == p["vocab"] + 1
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")  # the delta's tokenizer, with its pad token
    assert len(tok) == p["vocab"] + 1 and tok.pad_token == "[PAD]"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == p["vocab"] + 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)


def test_a_shape_mismatch_is_refused_in_one_line_before_writing(tmp_path):
    p = pair(tmp_path, extra_rows=0)
    other = llama(2, p["vocab"], hidden=64)
    sd = other.state_dict()
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)  # a different intermediate size
    broken = tmp_path / "broken"
    other.save_pretrained(broken)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(broken / "model.safetensors"))
    with pytest.raises(
        DeltaError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \[128, 64\] in the base"
    ):
        apply_delta(p["base_dir"], broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_refused_by_the_cli(tmp_path):
    p = pair(tmp_path, extra_rows=0)
    llama(3, p["vocab"], hidden=32).save_pretrained(tmp_path / "small")
    r = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "apply-delta", "--base", str(p["base_dir"]),
         "--delta", str(tmp_path / "small"), "--target", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "Error: base and delta are different architectures: hidden_size 64 (base) vs 32 (delta); "
        "the delta must be made from this base model"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_peak_memory_stays_near_one_shard(tmp_path):
    """A 6-layer Llama of about 250 MB in more than 10 shards: the CLI's peak RSS grows by a few shards over the
    process's RSS after imports, not by the model (base + delta + target would be 3 x 240 MB)."""
    tok = tiny_tokenizer()
    base, target = llama(0, len(tok), hidden=1024, layers=6), llama(1, len(tok) + 1, hidden=1024, layers=6)
    base.save_pretrained(tmp_path / "base", max_shard_size="20MB")
    tok.save_pretrained(tmp_path / "delta")
    make_delta(base, target, tmp_path / "delta", "20MB")
    model_mb = sum(t.numel() * 4 for t in target.state_dict().values()) / 2**20
    del base, target
    code = (
        "import sys, cli; from pipeline.delta import peak_rss_bytes; "
        "print('start', peak_rss_bytes(), flush=True); cli.main()"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "apply-delta", "--base", str(tmp_path / "base"),
         "--delta", str(tmp_path / "delta"), "--target", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    start = int(r.stdout.split("start ")[1].split()[0]) / 2**20
    peak = float(r.stdout.split("peak RSS ")[1].split()[0])
    shards = len(list((tmp_path / "delta").glob("*.safetensors")))
    print(f"model {model_mb:.0f} MB in {shards} shards; RSS after imports {start:.0f} MB, peak {peak:.0f} MB")
    assert shards >= 10 and model_mb > 200
    # measured: RSS 222 MB after imports, peak 262 MB for a 243 MB model in 15 shards of <= 20 MB
    assert peak - start < 4 * 20 and peak - start < 0.5 * model_mb, (start, peak, model_mb)
