# Topeng: `make demo` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv demo test lint unit bench fuzz soak asan clean

all: test

# Reinstalled when a C module (masking loop, relay) changes, so neither is ever stale.
$(STAMP): pyproject.toml proxy/policy/_splice.c proxy/_relay.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m proxy demo

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# The C modules (masking loop, relay) under AddressSanitizer and UBSan: rebuilt with them for
# the run of their tests, then the normal builds are put back.
asan: $(STAMP)
	@set -e; inc="$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])")"; \
	splice=$$($(PY) -c "import proxy.policy._splice as m; print(m.__file__)"); \
	relay=$$($(PY) -c "import proxy._relay as m; print(m.__file__)"); \
	cp "$$splice" "$$splice.keep"; cp "$$relay" "$$relay.keep"; \
	trap 'mv -f "$$splice.keep" "$$splice"; mv -f "$$relay.keep" "$$relay"' EXIT; \
	for pair in "proxy/policy/_splice.c:$$splice" "proxy/_relay.c:$$relay"; do \
	    gcc -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fPIC -shared \
	        -I"$$inc" "$${pair%%:*}" -o "$${pair#*:}"; \
	done; \
	PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so)" \
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_fastmask.py tests/unit/test_masks.py \
	    tests/unit/test_session_tracked.py tests/unit/test_relay.py tests/unit/test_relay_gate.py

# Long forms of the fuzz and soak suites (make test runs their quick forms).
# TOPENG_FUZZ_SECONDS (default 300) is a wall-clock budget for all the fuzz tests together,
# fixture setup included: the run takes about that plus fixed costs (start-up, collection, one
# quick search per test once the budget is spent), well under a minute.
fuzz: $(STAMP)
	TOPENG_FUZZ_SECONDS=$${TOPENG_FUZZ_SECONDS:-300} $(PY) -m pytest -q -o timeout=0 tests/fuzz $(PYTEST_ARGS)

soak: $(STAMP)
	TOPENG_SOAK_SECONDS=$${TOPENG_SOAK_SECONDS:-600} TOPENG_SOAK_CONNECTIONS=$${TOPENG_SOAK_CONNECTIONS:-1000} \
	  $(PY) -m pytest -q -s -o timeout=0 tests/integration/test_soak.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
