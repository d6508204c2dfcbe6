# `make demo` and `make test` do all the set-up on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# glibc's malloc backs its large blocks with transparent huge pages (where THP is in "madvise"
# mode): XLA's CPU runtime maps fresh buffers every step, and faulting them in 4 KiB pages cost
# a fifth of the training's CPU time (`python bench/train_step.py --malloc`). Ignored by a glibc
# older than 2.35; a GLIBC_TUNABLES of your own is kept.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo demo-movielens test test-all lint format bench lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,beam]'
	$(PY) -m pip check
	touch $@

demo: $(VENV)/.installed
	$(PY) -m train.demo

# MovieLens-100K from a file you have (nothing is downloaded): GroupLens' ml-100k/u.data, or
# RecBole's ml-100k.inter (with a header). Starts over in runs/movielens: import, prepare, train
# configs/movielens.py, evaluate next-item retrieval and P(favorite) beside popularity.
ML_RUN := runs/movielens
demo-movielens: $(VENV)/.installed
	@test -f "$(ML100K)" || { echo "give the ratings file: make demo-movielens ML100K=path/to/ml-100k/u.data"; exit 2; }
	rm -rf $(ML_RUN)
	$(VENV)/bin/phoenix-import --input "$(ML100K)" --format tsv --columns user,item,rating,timestamp \
	  $$(case "$(ML100K)" in *.inter) echo --skip-rows 1;; esac) --out $(ML_RUN)/import \
	  --user user --item item --timestamp timestamp \
	  --rule 'click:*' --rule 'favorite:rating>=4' --rule 'not_interested:rating<=2'
	$(VENV)/bin/phoenix-prepare --data-dir $(ML_RUN)/prepared --train $(ML_RUN)/import/train.parquet \
	  --validation $(ML_RUN)/import/validation.parquet --test $(ML_RUN)/import/test.parquet
	$(VENV)/bin/phoenix-train --config configs/movielens.py --workdir $(ML_RUN)/train
	$(VENV)/bin/phoenix-eval --workdir $(ML_RUN)/train --step best --protocol next-item \
	  --corpus $(ML_RUN)/import/corpus.jsonl --output $(ML_RUN)/metrics.json

# Test files run in TEST_WORKERS processes (pytest-xdist), a file's tests in one: most of a test's
# time is XLA compiling, on one core, so 2 workers on 2 cores take about 0.6 of one's time.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The fast tier: unit tests and small in-process integration tests (under 5 minutes on 2 cores).
test: $(VENV)/.installed
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# Every test: the fast tier and the tests marked slow (subprocesses, two processes, signals and
# kill -9, the planner, the programs end to end). What CI runs after `make lint`.
test-all: $(VENV)/.installed
	$(PYTEST) $(PYTEST_ARGS)

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
