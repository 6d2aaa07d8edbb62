# Two commands do everything on a fresh machine: `make run` and `make test`.
# Both create .venv here, install localai and its pinned dependencies (idempotent: a stamp file
# skips the install when pyproject.toml has not changed), and pull the models they need.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= qwen2.5-coder-1.5b
# the TUI and the bundled plugins: each its own small distribution, installed beside localai
EXTRAS := tui $(wildcard plugins/*)

.PHONY: run test test-deps lint bench bench-engine bench-index bench-rag install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml tui/pyproject.toml $(wildcard plugins/*/pyproject.toml) native/install-llama
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	@echo "==> installing localai into $(VENV) (first time ~6 min: llama.cpp and hnswlib build from source)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@sh native/install-llama $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]' $(foreach p,$(EXTRAS),-e $(p))
	@touch $@

run: install
	@echo "==> pulling $(MODEL) if needed, then starting the chat (Ctrl-D to leave)"
	$(BIN)/localai models pull $(MODEL)
	$(BIN)/localai chat --model $(MODEL)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the TUI's end-to-end test drives a real terminal
test-deps:
	@command -v tmux >/dev/null || { echo "==> installing tmux (apt)"; \
	  apt-get update -qq && apt-get install -y -qq tmux >/dev/null; }

# then the kernel, engine and embedder tests again with torch and oneDNN capped to AVX2 and bf16
# reported absent, as on most laptops, so a test that holds only with AVX-512 or AMX fails here
# too (our C++ kernels are AVX2 builds everywhere; ggml's own ISA is the installed build's)
AVX2_TESTS := tests/test_qmatmul.py tests/test_kv_cache.py tests/test_torch_engine.py \
	tests/test_embedder.py

test: install lint test-deps
	$(BIN)/python -m pytest -q
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q $(AVX2_TESTS)

# Every benchmark prints one JSON object; BENCHMARKS.md records them with machine and date.
# The whole set takes hours on 2 cores (python3-doc ingest alone is ~1 h): run parts by target.
bench: bench-engine bench-index bench-rag

bench-engine: install
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/server.py
	$(BIN)/python bench/torch_runner.py speed --model smollm2-135m
	$(BIN)/python bench/torch_runner.py kv --ctx 4096 --bits 16 8 4 2
	$(BIN)/python bench/torch_runner.py needle --ctx 4096 --bits 16 4

bench-rag: install bench-index
	$(BIN)/python bench/rag.py

# The document index (numbers in BENCHMARKS.md). python3-doc comes from apt (as root); NFCorpus is
# read from ../shared/evals at run time, never copied into the repository.
bench-index: install
	@test -d /usr/share/doc/python3-doc/html || { echo "==> installing python3-doc (apt)"; \
	  apt-get update -qq && apt-get install -y -qq python3-doc >/dev/null; }
	$(BIN)/python bench/index_fts.py
	$(BIN)/python bench/index_nfcorpus.py
	$(BIN)/python bench/index_vectors.py
	$(BIN)/python bench/index_fusion.py
	$(BIN)/python bench/index_rescore.py
	$(BIN)/python bench/embedder.py
	$(BIN)/python bench/index_ingest.py
	$(BIN)/python bench/index_scale.py
	$(BIN)/python bench/index_watch.py
	$(BIN)/python bench/index_pydoc.py
	$(BIN)/python bench/index_postgres.py

clean-venv:
	rm -rf $(VENV)
