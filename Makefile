PY ?= .venv/bin/python

.PHONY: venv compile debug test test-pure bench bench-e2e bench-workers bench-tls fuzz fuzz-atheris clean

venv:
	python3 -m venv .venv && .venv/bin/pip install -e '.[test,bench]'

compile:
	$(PY) setup.py build_ext --inplace

debug:
	FASTLB_DEBUG=1 $(PY) setup.py build_ext --inplace --force

test:
	FASTLB_REQUIRE_EXTENSIONS=1 $(PY) -m pytest

test-pure:
	FASTLB_NO_EXTENSIONS=1 $(PY) -m pytest

bench:
	$(PY) -m pytest bench --benchmark-only --benchmark-group-by=func

bench-e2e:
	$(PY) bench/e2e.py

# fastlb --workers 1..N next to nginx worker_processes 1..N (see bench/README.md)
bench-workers:
	$(PY) bench/workers.py

# TLS handshakes/s and requests/s over TLS, fastlb next to nginx (see bench/README.md)
bench-tls:
	$(PY) bench/tls.py

# Differential fuzzing against h11 through a real fastlb (see tests/fuzzgen.py):
# a million cases (override: make fuzz FUZZ_CASES=N FUZZ_SEED=S); stops by itself
# and prints a summary, with a minimised reproducer per finding.
FUZZ_CASES ?= 1000000
FUZZ_SEED ?= 1
fuzz:
	$(PY) tests/fuzzgen.py --cases $(FUZZ_CASES) --seed $(FUZZ_SEED)

# Coverage-guided: the compiled core against the pure one (needs the fuzz extra).
FUZZ_TIME ?= 600
fuzz-atheris:
	$(PY) tests/fuzz_atheris.py -max_total_time=$(FUZZ_TIME)

clean:
	rm -rf build dist *.egg-info fastlb/_core.c fastlb/_core.*.so fastlb/_core.html
