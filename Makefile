# Everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUBS := federation/wire/icse/v1/node_pb2_grpc.py
PROTOS := $(wildcard protos/icse/v1/*.proto)
FEDERATION ?= dev.icse.test
DEMO_NODES ?= FR,DE,NL,ES,IT,SE

.PHONY: install stubs certs demo lint test vectors bench bench-scale bench-triage bench-watch bench-private load clean

install: $(STAMP) $(STUBS)
	@# Bytecode written once here: every CLI and node start then skips compiling
	@# the project's modules (~75 ms each), also where PYTHONDONTWRITEBYTECODE is set.
	$(PY) -m compileall -q -j 0 federation node gateway

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

stubs: $(STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -Ifederation/wire=protos \
		--python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

certs: install
	$(VENV)/bin/icse-pki --out certs/dev --federation $(FEDERATION) --nodes $(DEMO_NODES) --gateways eu-1

demo: certs
	$(PY) -m federation.demo --pki certs/dev --federation $(FEDERATION) --nodes $(DEMO_NODES)

# Lint (ruff) and type check (mypy); both configured in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install
	$(PY) -m pytest -q

# The protocol's test vectors (tests/test_vectors.py checks they are what this writes).
vectors: install
	$(PY) -m federation.vectors --out protos/testvectors

bench: install
	$(PY) tests/bench/bench_exact.py
	$(PY) tests/bench/bench_import.py
	$(PY) tests/bench/bench_pdq_index.py --sizes 1000000,10000000

# A node with 10 M PDQ + 10 M SHA-256 hashes, through its command lines (not part of `make test`).
# Extra flags: make bench-scale BENCH_SCALE_ARGS="--quick" (see tests/bench/bench_scale.py --help).
bench-scale: install
	$(PY) tests/bench/bench_scale.py $(BENCH_SCALE_ARGS)

# Directory triage beside hashdeep on generated trees (not part of `make test`).
# Extra flags: make bench-triage BENCH_TRIAGE_ARGS="--files 10000 --large 200 --images 200".
bench-triage: install
	$(PY) tests/bench/bench_triage.py $(BENCH_TRIAGE_ARGS)

# Standing queries: alert latency after an import, rows a re-ask searches (import vs store size).
# Extra flags: make bench-watch BENCH_WATCH_ARGS="--cases 100 --large 200000".
bench-watch: install
	$(PY) tests/bench/bench_watch.py $(BENCH_WATCH_ARGS)

# Private vs ordinary exact matching, side by side (not part of `make test`); 1 M stored by default.
# Extra flags: make bench-private BENCH_PRIVATE_ARGS="--stored 10000000".
bench-private: install
	$(PY) tests/bench/bench_private.py $(BENCH_PRIVATE_ARGS)

load: install
	$(PY) tests/bench/load.py

clean:
	rm -rf $(VENV) certs/dev .demo .pytest_cache federation/wire/icse *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
