# The README's contract: `make demo` and `make test` work on a fresh machine (Python 3.10+, pip).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench device-wheels clean

install: $(STAMP)   ## create .venv and install the pinned set (a no-op when .venv is current)

FFCV_SYSTEM := pkg-config libopencv-dev libturbojpeg0-dev

$(STAMP): pyproject.toml requirements.lock requirements-ffcv.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	@# The ffcv extra builds against system packages: installed here when we are root with apt-get.
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(FFCV_SYSTEM); fi
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  $(BIN)/python -m pip install --quiet -r requirements-ffcv.lock; \
	else echo "note: ffcv not installed (needs apt-get install $(FFCV_SYSTEM)); its backend and tests are skipped"; fi
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: install       ## built-in data -> shards -> verify -> train MoPro and the cross-entropy baseline -> summary
	$(BIN)/mopro-fast demo

test: install       ## the whole test suite (CPU)
	$(BIN)/python -m pytest -q

bench: install      ## every benchmark, quick settings: one JSON report + markdown table under benchmarks/results/
	$(BIN)/mopro-fast bench all --quick

WHEELS ?= benchmarks/wheels
device-wheels:      ## pure-Python wheels benchmarks/device_check.sh installs on a machine without internet (pinned as requirements.lock)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d $(WHEELS) \
		$$(grep -E '^(webdataset|braceexpand|omegaconf)==' requirements.lock)
	@ls $(WHEELS)

clean:
	rm -rf $(VENV) demo .pytest_cache
