# doqproxy — developer entry points. `make test` is the CI command (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install venv test test-engines lint debian-tools demo bench fuzz soak clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,top,qh3]'
	touch $@

venv: $(VENV)/.installed

install: venv

# dig and kdig (independent clients for the end-to-end tests), dnsperf, unbound
# and dnsmasq (the benchmark peers): installed with apt-get when missing.
debian-tools:
	@scripts/debian-tools.sh

lint: venv
	$(VENV)/bin/ruff check doqproxy tests bench contrib fuzz
	$(VENV)/bin/ruff format --check doqproxy tests bench contrib fuzz
	$(VENV)/bin/mypy

test: venv debian-tools lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=15
	$(MAKE) --no-print-directory test-engines

# The upstream-side end-to-end tests once more on aioquic, the reference engine (the
# suite runs on the default one, qh3; tests/test_quic_engines.py covers each engine).
ENGINE_E2E := tests/test_pool_e2e.py tests/test_upstream_liveness.py \
	tests/test_doq_response_id.py tests/test_ipv6_upstream.py tests/test_forward_via_serve.py \
	tests/test_forward_e2e.py
test-engines: venv
	DOQPROXY_QUIC_ENGINE=aioquic $(VENV)/bin/pytest -q -p no:cacheprovider $(ENGINE_E2E)

# One command, offline, no root: serve a demo zone over DoQ, forward to it, ask it.
DEMO_PORT ?= 5353
demo: venv
	$(PY) contrib/demo/run_demo.py --port $(DEMO_PORT)

# Not part of `make test`: about 4 minutes; installs dnsperf/unbound/dnsmasq and py-spy
# when missing. Markdown on stdout, figures in bench/results/latest.json (BENCHMARKS.md).
bench: venv
	$(PY) -m bench $(BENCH_ARGS)

# Not part of `make test`: every fuzz target (fuzz/targets.py) for a fixed number of
# inputs (1.86 million in all, a few minutes); Markdown with exec/s and coverage on stdout.
# FUZZ_ARGS="--scale 0.1" for a shorter run, or name targets: FUZZ_ARGS=validate.
fuzz: venv
	$(PY) -m fuzz $(FUZZ_ARGS)

# Not part of `make test`: 10 minutes of mixed load through a lossy relay, with the
# upstream restarted every 30 s (bench/soak.py). SOAK_SECONDS=90 for a short run.
SOAK_SECONDS ?= 600
soak: venv
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
