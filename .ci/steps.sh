#!/usr/bin/env bash
# The steps of `make test`, each timed: lint, unit tests, every notebook at smoke scale, a smoke book build.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  "$@"
  echo "=== $name: $((SECONDS - t0)) s"
}
step lint $V/ruff check .
step unit $V/pytest tests -q
step notebooks env SPARSEKIT_SCALE=smoke $V/pytest --nbval-lax --nbval-cell-timeout=600 -q -p no:cacheprovider notebooks
step smoke-book $V/python -m sparsekit.book --scale smoke --stage build/smoke --build
