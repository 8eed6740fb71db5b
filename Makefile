# The two commands a newcomer runs: `make run` and `make test`. Both need only Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The oldest FastAPI of the range pyproject.toml supports; the main venv has the newest.
FASTAPI_OLDEST ?= 0.115.0
COMPAT ?= .venv-compat

.PHONY: install compile compile-pgo run demo test test-compat lint unit bench schema docs clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The per-request modules, compiled in place with mypyc (policyroute/_compiled.py): built when
# they do not match their sources, skipped (running from source) when no C compiler works.
compile: $(STAMP)  ## compile the per-request modules (mypyc, in place; POLICYROUTE_PURE=1 skips)
	@$(PY) -m policyroute._build

# The build to deploy: compiled as above, run on the bench's chains to count what runs,
# then compiled again from those counts (gcc's profile-guided optimization; about three
# minutes). `make compile` keeps a profile-guided build whose sources still match.
compile-pgo: $(STAMP)  ## the per-request modules, profile-guided (what production should run)
	@$(PY) -m policyroute._build --pgo

run: compile  ## the example app on embedded Valkey and Pulsar, policy reload on
	$(VENV)/bin/policyroute run examples.app:app --reload

demo: compile  ## start the example on embedded backends, call every denial and success path, stop
	$(PY) -m examples.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check policyroute tests bench examples docs
	$(VENV)/bin/mypy policyroute tests bench examples docs

# The whole suite on the compiled modules (what production runs), then the per-request
# paths again from source (what an install without a C compiler runs).
PURE_SUITE := tests/steps tests/backends tests/test_chain.py tests/test_gate.py tests/test_compiled.py

unit: compile
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected NO tests - failing loudly" >&2; exit 1; fi; \
	test $$rc -eq 0 || exit $$rc; \
	echo "make test: the per-request paths again, from source (POLICYROUTE_PURE=1)"; \
	POLICYROUTE_PURE=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_SUITE); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected NO tests - failing loudly" >&2; exit 1; fi; \
	exit $$rc

test: lint unit  ## lint, then the whole suite against real servers it starts itself

test-compat: $(STAMP)  ## the gate's test table against the oldest FastAPI of the supported range
	@test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q -e '.[dev]' 'fastapi==$(FASTAPI_OLDEST)'
	@$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider tests/test_gate.py tests/test_gate_http.py \
	  tests/test_binding.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-compat: pytest collected NO tests - failing loudly" >&2; exit 1; fi; \
	exit $$rc

bench: compile-pgo  ## ratios against bare FastAPI, slowapi and fastapi-limiter; lint and reload timings
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1; } || \
	  echo "make bench: wrk not available; using the built-in Python load generator" >&2
	@$(PY) -c 'import bench.backend as b, sys; sys.exit(b.jemalloc_library() is None)' || \
	  { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && apt-get install -y -qq libjemalloc2) \
	  >/dev/null 2>&1; } || echo "make bench: libjemalloc2 not available; Valkey runs with libc malloc" >&2
	$(PY) -m bench
	@command -v valgrind >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq valgrind) >/dev/null 2>&1; } || \
	  echo "make bench: valgrind not available; no instruction counts" >&2
	@if command -v valgrind >/dev/null 2>&1; then \
	  $(PY) -m bench.instructions worker --loop uvloop bare core local full && \
	  $(PY) -m bench.instructions server --loop uvloop bare core local full && \
	  $(PY) -m bench.instructions valkey full limit; fi

schema: $(STAMP)  ## regenerate the committed JSON Schema of the policy language
	$(VENV)/bin/policyroute schema -o policies/schema.json

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about future MkDocs releases, not about these docs.
docs: $(STAMP)  ## the documentation site into site/; any warning fails the build
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(COMPAT) .mypy_cache .ruff_cache .pytest_cache site build
	find policyroute -name '*.so' -delete; rm -f policyroute/_native.json
