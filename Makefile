PY ?= python3

.PHONY: install test soak bench

install:
	$(PY) -m pip install -q -e '.[dev]'

# The test command of the README and of .ci/run.
test: install
	$(PY) -m pytest -q

soak: install
	$(PY) -m pytest -q -m slow --run-slow
