# Two set-up commands, both self-contained on a fresh machine:
#   make run   - create the venv, install, start the broker with floki.toml
#   make test  - create the venv, install, run every test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/floki start -c floki.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	@$(BIN)/python -c "import matplotlib, tqdm" 2>/dev/null || $(BIN)/pip install --quiet -e '.[test,bench]' \
		|| echo "make bench: the bench extras did not install; running without chart and tqdm"
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
