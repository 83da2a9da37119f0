# Two commands do all set-up on a fresh machine:
#   make demo   - install into .venv, make a sample WebVid corpus, run the pipeline on it
#   make test   - install into .venv, lint, run the test suite
# On a GPU cluster install into your own environment instead: `pip install -e .` next to your CUDA torch.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch is pinned in the same pip command: 2.13.0 is a CPU wheel; a looser spec pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
DEMO    ?= demo_out
export RAY_AUTH_MODE ?= disabled
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup demo test lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# The main job on the embedded default: 12 synthetic WebVid clips (+3 faulty rows) -> Ray Data
# preprocessing with the tiny frozen encoder's feature cache -> DeepSpeed stage-1 training (tiny preset,
# CPU, MLflow in the run dir) -> captions of two clips and of every shard sample, held-out metrics.
demo: setup
	rm -rf $(DEMO)/shards $(DEMO)/run $(DEMO)/captions.jsonl
	$(BIN)/python cli.py make-sample --output $(DEMO)/webvid --clips 12 --faults
	$(BIN)/python cli.py preprocess --annotations $(DEMO)/webvid/annotations --videos $(DEMO)/webvid/videos \
		--output $(DEMO)/shards --samples-per-shard 2 --size 56 --cache-features --encoder tiny
	$(BIN)/python cli.py train --config configs/stage1_tiny.yaml data.shards=$(DEMO)/shards \
		run_dir=$(DEMO)/run max_steps=30 save_every=10
	$(BIN)/python cli.py caption $(DEMO)/run --greedy --max-new-tokens 20 \
		$(DEMO)/webvid/videos/000001_000050/1000000000.mp4 $(DEMO)/webvid/videos/000001_000050/1000000001.mp4
	$(BIN)/python cli.py caption-shards $(DEMO)/run $(DEMO)/shards --output $(DEMO)/captions.jsonl \
		--greedy --max-new-tokens 20
	$(BIN)/python cli.py evaluate $(DEMO)/run $(DEMO)/shards --metrics --max-new-tokens 20 --track $(DEMO)/run

test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/preprocess_bench.py
	$(BIN)/python benchmarks/feature_cache_bench.py
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/loader_bench.py
	$(BIN)/python benchmarks/command_bench.py
	$(BIN)/python benchmarks/bookkeeping_bench.py
	$(BIN)/python benchmarks/encoder_precision.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
