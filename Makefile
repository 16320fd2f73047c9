PY ?= python3

.PHONY: install serve test

install:
	$(PY) -m pip install -q -e '.[dev]'

# The demo command of the README: the committed demo model and editor on 127.0.0.1:8000.
serve: install
	hiedit serve

# The test command of the README and of .ci/run.
test: install
	$(PY) -m pytest -q
