"""scripts/demo.sh (`make demo`) runs independent steps side by side: each step must start only after
what it reads exists, and one failed step must stop the demo, name itself, and leave nothing running.

Checked with a stand-in interpreter (PYTHON=fake) that logs each `cli.py` command's start and end and
writes the few files the script itself reads; the real chain runs in tests/test_learning.py."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

FAKE = textwrap.dedent(
    r"""
    #!/usr/bin/env bash
    # the demo's python: `-c CODE` (version print, comm-op build) or `cli.py COMMAND ...`
    if [ "$1" = -c ]; then echo "2.0 4.0 0.1"; exit 0; fi
    cmd=$2; shift 2
    out=""; prev=""
    for a in "$@"; do
        [ "$prev" = --output ] && out=$a
        case $a in run_dir=*) out=${a#run_dir=} ;; esac
        prev=$a
    done
    name=$cmd; [ "$cmd" = preprocess ] && name="preprocess:$(basename "$out")"
    [ "$cmd" = train ] && name="train:$(basename "$out")"
    [ "$cmd" = grounded-eval ] && name="eval:$(basename "$out")"
    echo "start $name $(date +%s.%N)" >>"$LEDGER"
    sleep "${DELAY:-0.3}"
    case $cmd in
    make-sample)
        mkdir -p "$out/heldout/annotations" "$out/train/annotations"
        printf 'videoid,a,b,page_dir,name,c,d,e,kind\n7,x,x,000001_000100,a red square moves left,x,x,x,novel\n' \
            >"$out/heldout/annotations/0.csv" ;;
    tiny-llm | tiny-encoder | preprocess) mkdir -p "$out"; echo weights >"$out/w" ;;
    train) mkdir -p "$out/export" ;;
    chat) printf 'ASSISTANT: red\nASSISTANT: square\nASSISTANT: left\n' ;;
    report) echo "held-out table"; echo "report: x.html" ;;
    esac
    if [ "$name" = "${FAIL:-}" ]; then echo "boom in $name"; exit 3; fi
    echo "end $name $(date +%s.%N)" >>"$LEDGER"
    """
).lstrip()


def run_demo(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    ledger = tmp_path / "ledger.txt"
    environ = {**os.environ, "PYTHON": str(fake), "LEDGER": str(ledger), "STANDINS_CACHE": "", **env}
    environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", str(tmp_path / "demo")],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    times: dict[str, dict[str, float]] = {}
    for line in ledger.read_text().splitlines() if ledger.exists() else []:
        what, name, at = line.split()
        times.setdefault(name, {})[what] = float(at)
    return proc, times


def test_each_step_starts_after_what_it_reads(tmp_path):
    proc, t = run_demo(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    needs = {  # step -> the steps whose output it reads
        "tiny-llm": ["make-sample"],
        "preprocess:train_shards": ["make-sample", "tiny-encoder"],
        "preprocess:heldout_shards": ["make-sample", "tiny-encoder"],
        "preprocess:videochat_shards": ["make-sample", "tiny-encoder"],
        "train:run": ["preprocess:train_shards", "tiny-llm"],
        "eval:eval": ["train:run", "preprocess:heldout_shards"],
        "train:run_stage2": ["train:run", "preprocess:videochat_shards", "tiny-llm"],
        "eval:eval_stage2": ["train:run_stage2", "preprocess:heldout_shards"],
        "chat": ["train:run_stage2"],
        "report": ["eval:eval", "eval:eval_stage2"],
    }
    assert set(t) == set(needs) | {"make-sample", "tiny-encoder"}
    for step, inputs in needs.items():
        for first in inputs:
            assert t[step]["start"] >= t[first]["end"], f"{step} started before {first} ended"
    # and the independent ones overlap: the encoder beside the corpus, stage 1 beside the other shards,
    # stage 2 beside stage 1's evaluation
    for a, b in [
        ("tiny-encoder", "make-sample"),
        ("train:run", "preprocess:heldout_shards"),
        ("train:run_stage2", "eval:eval"),
    ]:
        assert t[a]["start"] < t[b]["end"] and t[b]["start"] < t[a]["end"], f"{a} and {b} did not overlap"
    out = proc.stdout
    assert "USER: Which way does it move? ASSISTANT: left" in out
    table = out[out.index("time per step") :]
    for name in ["corpus", "tiny-encoder", "stage1-train", "preprocess-heldout", "stage2-train", "report"]:
        assert f"  {name} " in table
    assert "total" in table


def test_a_failed_step_stops_the_demo_and_what_ran_beside_it(tmp_path):
    # stage 1 fails while the held-out and VideoChat shards are being written beside it
    proc, t = run_demo(tmp_path, FAIL="train:run", DELAY="1")
    assert proc.returncode == 1
    assert "[demo] stage1-train FAILED" in proc.stdout and "boom in train:run" in proc.stdout
    assert "result:" not in proc.stdout
    assert "train:run_stage2" not in t and "report" not in t
    # nothing of the demo is left running (the fake's sleeps would show up as its children)
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]
