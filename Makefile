PY ?= .venv/bin/python

.PHONY: venv compile debug test test-pure bench bench-e2e clean

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

clean:
	rm -rf build dist *.egg-info fastlb/_core.c fastlb/_core.*.so fastlb/_core.html
