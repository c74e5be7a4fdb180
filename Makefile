# The README's contract: `make demo` and `make test` work on a fresh machine (Python 3.10+, pip).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)   ## create .venv and install the pinned set (a no-op when .venv is current)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: install       ## built-in data -> shards -> verify (and, once the trainer lands, train + evaluate)
	$(BIN)/mopro-fast demo

test: install       ## the whole test suite (CPU)
	$(BIN)/python -m pytest -q

bench: install      ## every benchmark, quick settings
	$(BIN)/mopro-fast bench convert --json

clean:
	rm -rf $(VENV) demo .pytest_cache
