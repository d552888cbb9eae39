# make test: everything a fresh Debian machine needs, then the whole suite.
# make demo: the main job against a local sandbox remote.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test soak demo bench sysdeps clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

sysdeps:
	./scripts/ensure-system-deps.sh

test: $(STAMP) sysdeps
	$(PY) -m pytest -q

# make soak: the long seeded soak (thousands of operations, connection drops); prints figures.
SOAK_OPS  ?= 3000
SOAK_SEED ?= 20240601
soak: $(STAMP) sysdeps
	SOAK_OPS=$(SOAK_OPS) SOAK_SEED=$(SOAK_SEED) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_soak.py

demo: $(STAMP) sysdeps
	$(PY) examples/demo.py

bench: $(STAMP) sysdeps
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/push_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
