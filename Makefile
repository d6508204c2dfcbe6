# `make demo` and `make test` do all the set-up on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format bench lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m pip check
	touch $@

demo: $(VENV)/.installed
	$(PY) -m train.demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff, configured in pyproject.toml: the tree is lint-clean and formatted.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	$(PY) bench/forward.py

# Re-pin every installed package after a dependency change in pyproject.toml.
lock: $(VENV)/.installed
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
