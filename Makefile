# sparsekit: `make book` regenerates every result and builds the book; `make test` runs all tests.
# Both set up .venv first when it is missing or older than the requirements.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsekit-installed
APT_PACKAGES := $(shell cat binder/apt.txt)
SCALE ?= book
export PYTHONHASHSEED := 0

.PHONY: setup apt test lint unit notebooks smoke-book book book-check teachers bench calibrate peer lab clean

setup: $(STAMP) apt

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is the first line of requirements.txt: the local CPU wheel, never a CUDA build
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sparsekit)" >/dev/null
	@touch $@

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "missing Debian packages: $$missing"; \
		echo "install them with: sudo apt-get install -y $$missing"; \
	fi

test: setup
	bash .ci/steps.sh

lint: setup
	$(VENV)/bin/ruff check .

unit: setup
	$(VENV)/bin/pytest tests -q

notebooks: setup
	SPARSEKIT_SCALE=smoke $(VENV)/bin/pytest --nbval-lax --nbval-cell-timeout=600 -q -p no:cacheprovider notebooks

smoke-book: setup
	$(PY) -m sparsekit.book --scale smoke --stage build/smoke --build

teachers: setup
	$(PY) -m sparsekit.tasks.train_all --scale $(SCALE)

book: setup
	$(PY) -m sparsekit.book --scale $(SCALE) --stage . --build

# the built book in headless Chromium (Debian's chromium + chromium-driver): images, math, links, no
# error output; full-page screenshots in book/_build/screens/
book-check: setup
	$(PY) -m sparsekit.book_check book/_build/html

bench: setup
	$(PY) kernels/bench_prune.py
	$(PY) kernels/bench_linear.py --json build/bench_linear.json
	$(PY) kernels/bench_decode.py --json build/bench_decode.json

# DeepSparse (the paper's CPU runtime) against sparsekit on the same pruned MLP. DeepSparse needs numpy < 2,
# so it lives in its own virtualenv, never in .venv.
PEER_VENV := .venv-peer
peer: setup
	@test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet "deepsparse==1.8.0" "numpy==1.26.4" "onnx==1.14.1"
	$(PY) kernels/bench_peer.py --peer-python $(PEER_VENV)/bin/python --json build/bench_peer.json

# SparseLinear's CPU dispatch rules for this machine ($SPARSEKIT_CACHE/kernels/calibration.json)
calibrate: setup
	$(VENV)/bin/sparsekit bench --calibrate

lab: setup
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf build book/_build book/_executed _build .pytest_cache .ruff_cache
