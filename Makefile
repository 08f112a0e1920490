VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test lint typecheck clean bench bench-quick bench-profile

$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) examples/order_demo.py

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

typecheck: $(VENV)/.installed-test
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q

# The benchmark needs only an installed tether (no stamp: it reuses any existing .venv).
$(PY):
	$(MAKE) $(VENV)/.installed-test

bench: $(PY)
	$(PY) -m bench

bench-quick: $(PY)
	$(PY) -m bench --quick

bench-profile: $(PY)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.profile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
