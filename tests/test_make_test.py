"""`make test`'s own set-up (scripts/run_tests.sh + scripts/test_setup.sh): a throwaway Redis when none answers at
REDIS_URL (stopped afterwards), and one clear line before any test runs when a tool is missing and cannot be
installed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
RUN_TESTS = REPO / "scripts" / "run_tests.sh"


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def path_without(tmp: Path, *hidden: str) -> str:
    """A PATH of one folder linking every command of the system PATH except `hidden`."""
    farm = tmp / "bin"
    farm.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = os.path.join(folder, name)
            if name not in hidden and not (farm / name).exists() and os.access(target, os.X_OK):
                (farm / name).symlink_to(target)
    return str(farm)


def stub_tools(tmp: Path, *names: str) -> str:
    """A folder of do-nothing commands (so a test does not depend on, or install, the real ones)."""
    stubs = tmp / "stubs"
    stubs.mkdir()
    for name in names:
        (stubs / name).write_text("#!/bin/sh\nexit 0\n")
        (stubs / name).chmod(0o755)
    return str(stubs)


def test_without_redis_it_starts_a_throwaway_one_for_the_suite_and_stops_it_afterwards(tmp_path):
    probe = tmp_path / "test_probe.py"
    seen = tmp_path / "seen.txt"
    probe.write_text(
        "import os, redis\n"
        "def test_redis_answers():\n"
        f"    open({str(seen)!r}, 'w').write(os.environ['REDIS_URL'])\n"
        "    assert redis.Redis.from_url(os.environ['REDIS_URL']).ping()\n")
    dead = f"redis://127.0.0.1:{dead_port()}/0"
    env = {**os.environ, "REDIS_URL": dead, "PY": sys.executable,
           "PATH": stub_tools(tmp_path, "promtool", "haproxy") + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", str(RUN_TESTS), str(probe), "-p", "no:cacheprovider"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout, out.stdout
    url = seen.read_text()
    assert url != dead and re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", url), url
    assert f"started a throwaway redis-server at {url}" in out.stderr, out.stderr
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # stopped by the EXIT trap
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        except redis.ConnectionError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the throwaway Redis at {url} is still running after the suite")


def test_a_redis_that_answers_is_used_as_it_is(tmp_path, redis_url):
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"import os\ndef test_url():\n    assert os.environ['REDIS_URL'] == {redis_url!r}\n")
    env = {**os.environ, "REDIS_URL": redis_url, "PY": sys.executable,
           "PATH": stub_tools(tmp_path, "promtool", "haproxy") + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", str(RUN_TESTS), str(probe), "-p", "no:cacheprovider"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
    assert "throwaway" not in out.stderr and redis.Redis.from_url(redis_url).ping()


def test_a_missing_tool_that_cannot_be_installed_stops_with_one_line_before_any_test(tmp_path):
    """No promtool and no apt-get on PATH: one line naming the package, exit 2, pytest never started."""
    probe = tmp_path / "test_probe.py"
    ran = tmp_path / "ran"
    probe.write_text(f"def test_never():\n    open({str(ran)!r}, 'w').write('ran')\n")
    env = {**os.environ, "PY": sys.executable, "PATH": path_without(tmp_path, "promtool", "apt-get")}
    out = subprocess.run(["bash", str(RUN_TESTS), str(probe)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == "" and not ran.exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("make test: cannot set up the test suite: 'promtool'"), lines
    assert "apt-get install prometheus" in lines[0], lines
    assert ("no apt-get" if os.geteuid() == 0 else "not root") in lines[0], lines
