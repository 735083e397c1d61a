#!/usr/bin/env bash
# `make test`: set up what the suite needs (scripts/test_setup.sh: Redis, promtool, haproxy), run pytest, and
# stop the throwaway Redis afterwards (also on failure or Ctrl-C). Arguments go to pytest.
#   scripts/run_tests.sh                        # the whole suite
#   scripts/run_tests.sh tests/service -x       # a part of it
set -euo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-.venv/bin/python}
# shellcheck source=scripts/test_setup.sh
source scripts/test_setup.sh
trap test_teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
test_setup
"$PY" -m pytest -q "$@"
