# The two commands: `make serve` and `make test`. Both create .venv on first use.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
HOST     ?= 127.0.0.1
PORT     ?= 8000

.PHONY: serve test venv lint clean-venv

# torch first, pinned: on these machines `torch==2.13.0` is the CPU build on local disk.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	touch $@

venv: $(BIN)/.installed

# Serve on http://$(HOST):$(PORT) with the checkpoints in artifacts/ (Redis only if REDIS_URL is set by you).
serve: venv
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

# The whole suite (scripts/run_tests.sh): against the Redis at $(REDIS_URL) (default redis://127.0.0.1:6379/0),
# or a throwaway redis-server it starts and stops when none answers there; installs promtool (package
# `prometheus`) and haproxy with apt-get when missing, or stops with one line saying what to install.
test: venv
	PY=$(BIN)/python bash scripts/run_tests.sh

lint: venv
	$(BIN)/ruff check model training service bench tests

clean-venv:
	rm -rf $(VENV)
