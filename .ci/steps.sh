#!/usr/bin/env bash
# The steps of `make test`, each timed: lint, unit tests, every notebook at smoke scale, a smoke book build,
# and the smoke book in headless Chromium. With $CI_STEPS_FILE set (.ci/run) each step's seconds are
# appended to it. A failing step does not stop the later ones; the script fails at the end, naming it.
set -uo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
mkdir -p build
failed_steps=()
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  if ! "$@"; then failed_steps+=("$name"); echo "=== $name: FAILED"; fi
  echo "=== $name: $((SECONDS - t0)) s"
  if [ -n "${CI_STEPS_FILE:-}" ]; then echo "$name $((SECONDS - t0))" >> "$CI_STEPS_FILE"; fi
}
step lint $V/ruff check .
step unit $V/pytest tests -q --junitxml=build/junit-unit.xml
step notebooks env SPARSEKIT_SCALE=smoke $V/pytest --nbval-lax --nbval-cell-timeout=600 -q \
  -p no:cacheprovider --junitxml=build/junit-notebooks.xml notebooks
step smoke-book $V/python -m sparsekit.book --scale smoke --stage build/smoke --build
no_browser=$($V/python -c "from sparsekit.book_check import browser_available; print(browser_available() or '')")
if [ -z "$no_browser" ]; then
  step book-check $V/python -m sparsekit.book_check build/smoke/book/_build/html
else
  echo "=== book-check: SKIPPED: $no_browser"
fi
# one closing line for everything pytest ran
$V/python - <<'PY' | tee build/ci_tests.txt
import os
import xml.etree.ElementTree as ET
totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for path in ("build/junit-unit.xml", "build/junit-notebooks.xml"):
    if not os.path.exists(path):  # the step failed before pytest wrote it
        continue
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"tests: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
if [ ${#failed_steps[@]} -gt 0 ]; then
  echo "make test: failed steps: ${failed_steps[*]}"
  exit 1
fi
