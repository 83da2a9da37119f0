# Two commands do all set-up on a fresh machine:
#   make demo   - install into .venv, make a grounded sample corpus, run the whole pipeline on it, show it learns
#   make test   - install into .venv, lint, the fast test tier (pytest -m "not slow": minutes)
#   make test-all - the same plus the slow tier: the learning chain, multi-process DeepSpeed, Slurm (CI)
# On a GPU cluster install into your own environment instead: `pip install -e .` next to your CUDA torch.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch is pinned in the same pip command: 2.13.0 is a CPU wheel; a looser spec pulls a multi-GB CUDA build.
# pip byte-compiles the ~22,000 modules it installs one after the other (38 s of a 66 s install); compileall
# does the same on every core (29 s on 2). They must be compiled ahead: where PYTHONDONTWRITEBYTECODE is set
# (as on the CI machines) nothing is cached later and every process would compile torch again. compileall
# exits 1 over the few files of other Python versions that ship in packages, as pip ignores them.
TORCH   ?= torch==2.13.0
DEMO    ?= demo_out
export RAY_AUTH_MODE ?= disabled
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup demo test test-all lint format bench rehearsal clean serve browser

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile "$(TORCH)" -e '.[dev]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

setup: $(BIN)/.installed

# The main job as a story that ends with the proof that it learns (scripts/demo.sh says each step):
# grounded corpus with faulty rows -> tiny LLM + tiny encoder -> Ray Data preprocessing with the feature
# cache -> DeepSpeed stage 1 -> held-out accuracy per factor, two ablations -> stage 2 -> chat -> report.
demo: setup
	PYTHON=$(BIN)/python bash scripts/demo.sh $(DEMO)

# Two tiers (tests marked @pytest.mark.slow take over ~10 s each: the learning chain, multi-process
# DeepSpeed, Ray jobs over many clips, training chains, Slurm submissions).
test: setup lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup lint browser
	$(BIN)/python -m pytest -q

# The headless browser of tests/test_serve.py: Debian's chromium + chromium-driver (Playwright cannot
# download its own browser without internet). Needs root (CI: .ci/run); without it the browser tests skip.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "[browser] chromium and chromedriver are installed";\
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver;\
	else echo "[browser] run as root: apt-get install -y chromium chromium-driver (the browser tests skip without them)"; fi

# The local web demo on the demo's stage-2 run (after `make demo`), with three held-out clips as examples:
# http://127.0.0.1:7860 (SERVE="--host 0.0.0.0 --port 8080" to change; other hosts get a warning)
SERVE ?=
serve: setup
	@test -d $(DEMO)/run_stage2 || { echo "no $(DEMO)/run_stage2: run 'make demo' first"; exit 1; }
	$(BIN)/python cli.py serve $(DEMO)/run_stage2 --greedy --max-new-tokens 24 \
		$$(tail -n +2 $(DEMO)/grounded/heldout/annotations/0.csv | head -3 | \
		   awk -F, '{printf "--example $(DEMO)/grounded/videos/%s/%s.mp4 ", $$4, $$1}') $(SERVE)

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
	$(BIN)/python benchmarks/demo_levers_bench.py

# Real-size dress rehearsal on the CPU (not in `make test`): vit-g-7b with random weights, feature cache,
# ZeRO-2 steps, checkpoint, resume, export, caption. The full 7B needs ~20 GB of free RAM and hours of a
# quiet CPU; a shallower run keeps every dtype/shape seam: make rehearsal REHEARSAL="--llm-layers 2 --vision-layers 1"
REHEARSAL ?=
rehearsal: setup
	$(BIN)/python benchmarks/rehearsal.py $(REHEARSAL)

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
