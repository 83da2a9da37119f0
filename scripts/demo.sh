#!/usr/bin/env bash
# `make demo`: the pipeline as a user runs it, on a corpus a model can learn, ending with the proof.
#
#   grounded corpus (a coloured shape moving over noise, "a red square moves left"; train + held-out
#   splits, faulty rows) -> tiny LLM and tiny image encoder (a CLIP stand-in) trained on the spot -> Ray
#   Data preprocessing with that frozen encoder's feature cache (captions and VideoChat conversations) -> DeepSpeed stage 1 -> held-out
#   accuracy per factor + two ablations -> stage 2 on the conversations -> chat -> HTML/PNG report.
#
# Each command is printed with its time; its output goes to DEMO/logs/NAME.log. The last screen is the
# result, then the time of every step and the total. Usage: scripts/demo.sh [DEMO_DIR]
# (PYTHON=.venv/bin/python by default).
#
# The two stand-ins (tiny LLM, tiny encoder) are kept in a content-keyed cache, STANDINS_CACHE
# (default .cache/standins, never in git; STANDINS_CACHE= turns it off): a rerun with the same inputs,
# stand-in code and library versions copies the folders instead of training them again (the same bytes:
# their training is seeded). The key is the SHA-256 of the command, the standins/ and pipeline/ sources,
# the versions of torch / transformers / tokenizers and, for the tiny LLM, its annotations.
set -euo pipefail
DEMO=${1:-demo_out}
PY=${PYTHON:-.venv/bin/python}
CACHE=${STANDINS_CACHE-.cache/standins}
G=$DEMO/grounded
T0=$(date +%s)
# Steps that do not depend on each other run side by side (the schedule below), one torch thread each
# (but the tiny encoder, below):
# the tiny models' matrices are too small for a second thread to pay (stage 2: 109 s with 2 threads,
# 105 s with 1), and two trainings with 2 threads each on 2 cores spin for minutes (docs/PERFORMANCE.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

step() {  # step NAME COMMAND...: run, log, print the time (or the log's tail on failure)
    local name=$1 s
    shift
    s=$(date +%s)
    printf '[demo] %-22s %s\n' "$name" "$(echo "$*" | sed "s|$PY|python|" | cut -c1-90)"
    if ! "$@" >"$DEMO/logs/$name.log" 2>&1; then
        echo "[demo] $name FAILED ($DEMO/logs/$name.log):"
        tail -20 "$DEMO/logs/$name.log"
        return 1
    fi
    echo "$name $((s - T0)) $(($(date +%s) - s))" >>"$DEMO/logs/times.txt"
    printf '[demo] %-22s done in %d s\n' "$name" $(($(date +%s) - s))
}

die() {  # a step failed (it said which): stop the ones beside it too
    local job
    for job in $(jobs -p); do pkill -TERM -P "$job" 2>/dev/null; kill "$job" 2>/dev/null; done
    exit 1
}

finish() {  # finish PID...: wait for background steps
    local pid
    for pid in "$@"; do wait "$pid" || die; done
}

standin_key() {  # standin_key COMMAND...: what a stand-in's output depends on, hashed
    {
        echo "$*" | sed "s|$PY|python|"
        "$PY" -c "from importlib.metadata import version as v; print(v('torch'), v('transformers'), v('tokenizers'))"
        find standins pipeline cli.py -name '*.py' -print0 | sort -z | xargs -0 sha256sum
        for f in "$@"; do
            if [ -d "$f" ]; then find "$f" -type f -print0 | sort -z | xargs -0 sha256sum; fi
        done
    } | sha256sum | cut -c1-16
}

standin() {  # standin NAME OUTPUT COMMAND...: the step, or its output copied from the cache
    local name=$1 out=$2 key s
    shift 2
    if [ -z "$CACHE" ]; then step "$name" "$@"; return $?; fi
    s=$(date +%s)
    key=$(standin_key "$@")
    if [ -f "$CACHE/$name-$key/.complete" ]; then
        mkdir -p "$out" && cp -R "$CACHE/$name-$key/." "$out/" && rm -f "$out/.complete"
        echo "reused $CACHE/$name-$key" >"$DEMO/logs/$name.log"
        echo "$name $((s - T0)) $(($(date +%s) - s))" >>"$DEMO/logs/times.txt"
        printf '[demo] %-22s reused from %s (same inputs and code) in %d s\n' "$name" "$CACHE/$name-$key" \
            $(($(date +%s) - s))
        return
    fi
    step "$name" "$@" || return 1
    mkdir -p "$CACHE" && rm -rf "$CACHE/$name-$key.tmp" && cp -R "$out" "$CACHE/$name-$key.tmp"
    touch "$CACHE/$name-$key.tmp/.complete" && rm -rf "$CACHE/$name-$key" && mv "$CACHE/$name-$key.tmp" "$CACHE/$name-$key"
}

rm -rf "$DEMO" && mkdir -p "$DEMO/logs"
# On a fresh clone DeepSpeed JIT-compiles its CPU comm op in the first training (25-70 s of C++). Build it
# now in the background at low priority, so the idle moments of the steps before stage 1 (imports, Ray
# start-up, waits on decoders) pay for it; stage 1 waits for it. A no-op once built (without even the
# deepspeed import when the Makefile's TORCH_EXTENSIONS_DIR already holds it).
BUILT=${TORCH_EXTENSIONS_DIR:-/nonexistent}/deepspeed_shm_comm/deepspeed_shm_comm.so
[ -f "$BUILT" ] || nice -n 10 "$PY" -c "
from pipeline.distributed import comm_op_build_pending
if comm_op_build_pending():
    from deepspeed.accelerator import get_accelerator
    get_accelerator().create_op_builder('ShareMemCommBuilder').load()
" >"$DEMO/logs/comm-op.log" 2>&1 &
COMM_OP=$!
# The schedule: a step starts when what it reads is there; steps on one line run one after the other,
# the lines side by side (tests/test_demo_script.py checks both):
#   corpus -> tiny-llm --------------------------.  stage 1 ----------------------.  stage 2 ------.
#   tiny-encoder -------------> preprocess-train -'  preprocess-heldout, videochat -'  stage-1 eval  -'  eval, chat, report
ENC="features.blip2_path=$DEMO/tiny_encoder"
preprocess() {  # preprocess SPLIT_OR_VIDEOCHAT
    case $1 in
    videochat) step preprocess-videochat $PY cli.py preprocess --dataset videochat --annotations \
        "$G/train/videochat.json" --videos "$G/videos" --output "$DEMO/videochat_shards" --samples-per-shard 64 \
        --cache-features --encoder tiny "$ENC" ;;
    *) step "preprocess-$1" $PY cli.py preprocess --annotations "$G/$1/annotations" --videos "$G/videos" \
        --output "$DEMO/${1}_shards" --samples-per-shard 64 --cache-features --encoder tiny "$ENC" ;;
    esac
}
# The encoder is the longest step before training: two threads that sleep while they wait
# (OMP_WAIT_POLICY=PASSIVE) run it at one thread's pace while the corpus and the tiny LLM have the other
# core, and on both cores once they are done. Spinning threads (the default) would take twice as long
# beside them (docs/PERFORMANCE.md).
standin tiny-encoder "$DEMO/tiny_encoder" env OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE \
    $PY cli.py tiny-encoder --output "$DEMO/tiny_encoder" &
ENCODER=$!
step corpus $PY cli.py make-sample --grounded --faults --output "$G" || die
standin tiny-llm "$DEMO/tiny_llm" $PY cli.py tiny-llm --annotations "$G/train/annotations" --output "$DEMO/tiny_llm" &
LLM=$!
finish $ENCODER
preprocess train || die
finish $LLM
W=$(date +%s)
wait "$COMM_OP" || echo "[demo] building DeepSpeed's comm op ahead failed ($DEMO/logs/comm-op.log): stage 1 builds it"
[ $(($(date +%s) - W)) -gt 0 ] && echo "comm-op-wait $((W - T0)) $(($(date +%s) - W))" >>"$DEMO/logs/times.txt"
step stage1-train $PY cli.py train --config configs/stage1_tiny.yaml "data.shards=$DEMO/train_shards" \
    "run_dir=$DEMO/run" "model.llm_path=$DEMO/tiny_llm" &
STAGE1=$!
{ preprocess heldout && preprocess videochat; } &
SHARDS=$!
finish $STAGE1 $SHARDS
step stage1-eval $PY cli.py grounded-eval "$DEMO/run" "$DEMO/heldout_shards" --output "$DEMO/eval" \
    --probe "$DEMO/train_shards" &
EVAL1=$!
step stage2-train $PY cli.py train --config configs/stage2_tiny.yaml "init_from=$DEMO/run/export" \
    "run_dir=$DEMO/run_stage2" "model.llm_path=$DEMO/tiny_llm" "data.datasets=[{shards: $DEMO/videochat_shards}]" || die
finish $EVAL1
step stage2-eval $PY cli.py grounded-eval "$DEMO/run_stage2" "$DEMO/heldout_shards" --questions vicuna \
    --no-ablations --output "$DEMO/eval_stage2" || die
# a held-out clip (a novel colour/shape/direction triple when there is one) for the chat
ROW=$(grep -m1 ',novel$' "$G/heldout/annotations/0.csv" || sed -n 2p "$G/heldout/annotations/0.csv")
CLIP="$G/videos/$(echo "$ROW" | cut -d, -f4)/$(echo "$ROW" | cut -d, -f1).mp4"
printf 'What colour is the shape?\nWhat shape is it?\nWhich way does it move?\n' >"$DEMO/logs/questions.txt"
step chat bash -c "$PY cli.py chat $DEMO/run_stage2 $CLIP --greedy --max-new-tokens 12 <$DEMO/logs/questions.txt" || die
step report $PY cli.py report "$DEMO/run" "$DEMO/heldout_shards" --captions "$DEMO/eval/grounded_captions.jsonl" \
    --accuracy "$DEMO/eval/grounded_tables.json" --accuracy "$DEMO/eval_stage2/grounded_qa_tables.json" \
    --title "Video-LLaMA demo: tiny preset on the grounded corpus" || die

echo
echo "================ result: $(($(date +%s) - T0)) s from an empty $DEMO/ ================"
grep -E '^\[preprocess\].*(ok|failed)' "$DEMO/logs/preprocess-train.log" | tail -1 || true
grep -v '^report: ' "$DEMO/logs/report.log"
echo "chat about held-out clip $CLIP ($(echo "$ROW" | cut -d, -f5), a $(echo "$ROW" | cut -d, -f9) triple):"
paste -d' ' <(sed 's/^/  USER: /' "$DEMO/logs/questions.txt") <(grep '^ASSISTANT:' "$DEMO/logs/chat.log")
grep '^report: ' "$DEMO/logs/report.log"
echo "MLflow: mlflow ui --backend-store-uri sqlite:///$DEMO/run/mlflow.db"
echo
echo "time per step (s; steps side by side overlap):"
printf '  %-22s %6s %6s\n' step start took
sort -k2n "$DEMO/logs/times.txt" | while read -r name start took; do printf '  %-22s %6d %6d\n' "$name" "$start" "$took"; done
printf '  %-22s %6s %6d\n' total "" $(($(date +%s) - T0))
