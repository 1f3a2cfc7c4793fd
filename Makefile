.PHONY: test bench bench-quick

PYTHON ?= .venv/bin/python

test:
	bash scripts/run_tests.sh

bench:
	$(PYTHON) -m bench

bench-quick:
	$(PYTHON) -m bench --quick
