#!/usr/bin/env bash
# Set-up for `make test` on any machine (sourced by scripts/run_tests.sh, before pytest):
#   - Redis: when nothing answers at $REDIS_URL (default redis://127.0.0.1:6379/0), start a throwaway
#     `redis-server` on a free loopback port (no persistence, files in a temp dir) and export REDIS_URL for the
#     suite; `test_teardown` stops it again. A Redis that already answers is used as it is, never stopped.
#   - promtool (Debian package `prometheus`; tests/service/test_metrics.py) and haproxy (Debian package
#     `haproxy`; the rolling-restart tests put a real load balancer in front of the replicas): installed with
#     apt-get when missing, as are redis-server (package `redis-server`) when a Redis has to be started.
# Where something is missing and cannot be installed (not root, or no apt-get), it stops with one line naming
# what to install, before any test runs (exit 2).
# Environment: REDIS_URL, PY (the Python with the `redis` package; default .venv/bin/python).

XCROSS_TEST_PY=${PY:-.venv/bin/python}
XCROSS_TEST_REDIS_DIR=""

_setup_die() {
  echo "make test: cannot set up the test suite: $*" >&2
  exit 2
}

# _setup_need COMMAND PACKAGE WHY: COMMAND on PATH, or install the Debian PACKAGE, or stop with one line.
_setup_need() {
  local cmd=$1 pkg=$2 why=$3
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    _setup_die "'$cmd' ($why) is missing and cannot be installed here ($( [ "$(id -u)" != 0 ] && echo "not root" \
      || echo "no apt-get")); install the Debian package '$pkg' (apt-get install $pkg) or put '$cmd' on PATH"
  fi
  echo "make test: installing '$pkg' for '$cmd' ($why) with apt-get" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1; }; } ||
    _setup_die "apt-get install $pkg failed; install the Debian package '$pkg' (for '$cmd': $why) by hand"
  command -v "$cmd" >/dev/null 2>&1 ||
    _setup_die "installed '$pkg' but '$cmd' is still not on PATH ($PATH); put '$cmd' on PATH"
}

# _setup_redis_answers URL: 0 when a Redis answers PING at URL within 2 s.
_setup_redis_answers() {
  "$XCROSS_TEST_PY" - "$1" <<'PY' >/dev/null 2>&1
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2, socket_timeout=2).ping()
PY
}

_setup_free_port() {
  "$XCROSS_TEST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

test_setup() {
  [ -x "$XCROSS_TEST_PY" ] || command -v "$XCROSS_TEST_PY" >/dev/null 2>&1 ||
    _setup_die "no Python at PY=$XCROSS_TEST_PY (make test creates .venv first)"
  _setup_need promtool prometheus "checks the /metrics text in tests/service/test_metrics.py"
  _setup_need haproxy haproxy "the load balancer of the rolling-restart tests"
  export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
  if _setup_redis_answers "$REDIS_URL"; then
    echo "make test: using the Redis at REDIS_URL=$REDIS_URL" >&2
    return 0
  fi
  _setup_need redis-server redis-server "a throwaway Redis for the suite, since none answers at $REDIS_URL"
  local port
  port=$(_setup_free_port)
  XCROSS_TEST_REDIS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/xcross-test-redis.XXXXXX")
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir "$XCROSS_TEST_REDIS_DIR" --pidfile "$XCROSS_TEST_REDIS_DIR/redis.pid" \
    --logfile "$XCROSS_TEST_REDIS_DIR/redis.log" >/dev/null ||
    _setup_die "redis-server did not start on 127.0.0.1:$port (see $XCROSS_TEST_REDIS_DIR/redis.log)"
  local url="redis://127.0.0.1:$port/0" _i
  for _i in $(seq 100); do
    _setup_redis_answers "$url" && break
    sleep 0.1
  done
  _setup_redis_answers "$url" ||
    _setup_die "the throwaway redis-server on 127.0.0.1:$port does not answer (see $XCROSS_TEST_REDIS_DIR/redis.log)"
  echo "make test: nothing answers at REDIS_URL=$REDIS_URL; started a throwaway redis-server at $url" \
    "(stopped after the suite)" >&2
  export REDIS_URL=$url
}

# Stops the Redis that test_setup started (by its pid file), if any, and removes its directory.
test_teardown() {
  [ -n "$XCROSS_TEST_REDIS_DIR" ] || return 0
  local pidfile="$XCROSS_TEST_REDIS_DIR/redis.pid" pid _i
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _i in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -rf "$XCROSS_TEST_REDIS_DIR"
  XCROSS_TEST_REDIS_DIR=""
}
