"""The README's commands, run as written against the app `make serve` starts (`python -m service` with the shipped
artifacts/, on a free port): its start-up output, the README's curl and the response it shows, and the load test
of docs/service.md (sizes cut to fit the suite: `--requests 16 --payloads 4` appended; the URL is the server's).
`make test` itself is what runs this file."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import Server, free_port, wait_server

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SERVICE_DOC = (REPO / "docs" / "service.md").read_text()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def test_the_readme_is_a_front_page_under_10_kb_linking_pages_that_exist():
    assert len(README.encode()) < 10_240
    assert "make serve" in blocks(README, "bash")[0] and "make test" in blocks(README, "bash")[0]
    links = re.findall(r"\]\(((?:docs/)[^)#]+)\)", README)
    assert {"docs/service.md", "docs/deployment.md", "docs/training.md", "docs/performance.md"} <= set(links)
    for link in links:
        assert (REPO / link).is_file(), link
    assert README.count("<!-- results:") == 1 and README.count("<!-- end of results -->") == 1


def test_make_serve_is_python_m_service():
    recipe = re.search(r"^serve:.*\n\t(.*)$", (REPO / "Makefile").read_text(), flags=re.M).group(1)
    assert recipe == "$(BIN)/python -m service --host $(HOST) --port $(PORT)", recipe


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`make serve`'s command with the shipped artifacts and the default settings (no Redis, as the README says)."""
    port = free_port()
    log = tmp_path_factory.mktemp("readme") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCROSS_") and k != "REDIS_URL"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_server(server, timeout=900)
        yield server
    finally:
        server.stop()


def test_start_up_says_what_it_serves_without_library_warning_tables(served):
    log = served.log.read_text()
    assert "LOAD REPORT" not in log and "UNEXPECTED" not in log and "Loading weights" not in log, log[:3000]
    assert "Traceback" not in log, log[-3000:]
    served_line = re.search(r"service: serving 4 domains \((.*)\)", log)
    assert served_line, log[:3000]
    from service.loading import default_kind, find_all_checkpoints

    shipped = find_all_checkpoints(REPO / "artifacts")  # xcross where a domain has one, else its LoRA (partial ship)
    assert sorted(shipped) == ["Electronics", "Sports", "Tools", "Toys"]
    for domain, kinds in shipped.items():
        assert re.search(rf"\b{domain}: {default_kind(kinds)}\b", served_line.group(1)), served_line.group(1)
        assert "lora" in kinds  # every domain keeps its own LoRA as a served kind
    assert re.search(r"service: device cpu, backend torch", log) and "service: Redis off (REDIS_URL unset" in log


def test_the_readme_curl_gives_the_response_it_shows(served):
    curl = next(b for b in blocks(README, "bash") if b.startswith("curl"))
    shown = json.loads(blocks(README, "json")[0])
    args = shlex.split(curl.replace("localhost:8000", served.url.removeprefix("http://")))
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["model"] == shown["model"] and got["domain"] == shown["domain"]
    assert [(i["position"], i["id"], i["asin"], i["title"], i["rank"]) for i in got["items"]] == [
        (i["position"], i["id"], i["asin"], i["title"], i["rank"]) for i in shown["items"]]
    for g, s in zip(got["items"], shown["items"], strict=True):  # bf16 or fp32 depending on the CPU
        assert abs(g["score"] - s["score"]) < 0.05, (g, s)


def test_the_documented_load_test_command_passes_its_check(served):
    command = next(line for b in blocks(SERVICE_DOC, "bash") for line in b.splitlines()
                   if line.startswith("python -m bench.loadtest"))
    assert "--check" in command and "--url http://127.0.0.1:8000" in command
    args = shlex.split(command.replace("http://127.0.0.1:8000", served.url))
    out = subprocess.run([sys.executable, *args[1:], "--requests", "16", "--payloads", "4"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "16 requests, 8 clients" in out.stdout and "(16/16 ok)" in out.stdout, out.stdout
    assert "correct 16/16 (ranking = direct model call)" in out.stdout, out.stdout
