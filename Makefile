# exportdesk: `make dev` runs it, `make test` tests it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev serve test test-postgres test-all lint bench install clean
# The server test-postgres creates (and drops) a fresh database on, per test session.
TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres

$(STAMP): pyproject.toml jobs/_fastcsv.c  # the C extension is built by the install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/flask db upgrade
	$(BIN)/flask seed --if-empty
	$(BIN)/flask dev

# The web app as in production: gunicorn, WEB_WORKERS processes on BIND (docs/operations.md).
WEB_WORKERS ?= 4
BIND ?= 127.0.0.1:8000
serve: $(STAMP)
	$(BIN)/gunicorn --workers $(WEB_WORKERS) --bind $(BIND) --access-logfile - 'webapp:create_app()'

test: $(STAMP)
	$(BIN)/python -m pytest

test-postgres: $(STAMP)
	TEST_DATABASE_URL=$(TEST_POSTGRES_URL) $(BIN)/python -m pytest

# What CI runs: the whole suite on SQLite, then again on PostgreSQL.
test-all: test test-postgres

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) instance .pytest_cache .ruff_cache
