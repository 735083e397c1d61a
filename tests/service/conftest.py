"""Service fixtures: freshly initialised checkpoints (tiny random backbone in-process, the real MiniLM for
subprocess servers), engines built by the service's own loading code, and a runner for `python -m service`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model.backbone import Backbone
from model.checkpoint import load_lora, save_lora, save_xcross
from model.prompts import encode_pieces
from model.xcross import Head, XCross, XCrossConfig
from service.app import create_app
from service.cache import TokenCache
from service.catalog import Catalogs
from service.engine import Engine, locked_encoder
from service.loading import load_models
from service.settings import Settings
from tests.model.test_xcross import random_lora, randomize_trainables
from tests.tiny import tiny_backbone

REPO = Path(__file__).resolve().parents[2]
LORA_CFG = {"r": 16, "alpha": 32, "dropout": 0.1}
SOURCES = ("Sports", "Electronics")  # lora checkpoints; Tools is an X-Cross model over them
DOMAINS = ("Tools", *SOURCES)


def save_artifacts(root: Path, backbone: Backbone, *, top_k: int, seed: int = 0) -> Path:
    """lora/Sports, lora/Electronics (random non-zero LoRAs, seeded heads) and xcross/Tools over both."""
    dirs = []
    for s, domain in enumerate(SOURCES):
        head = Head(backbone.hidden_size)
        randomize_head(head, seed + s)
        dirs.append(save_lora(root / "lora" / domain, random_lora(backbone, seed + s), head, backbone,
                              domain=domain, lora_config=LORA_CFG))
    model = XCross(backbone, [load_lora(d, backbone)[0] for d in dirs], XCrossConfig(top_k=top_k)).eval()
    randomize_trainables(model, seed)
    randomize_head(model.head, seed + 7)
    save_xcross(root / "xcross" / "Tools", model, backbone, target="Tools",
                sources=list(zip(SOURCES, dirs, strict=True)))
    return root


def randomize_head(head: Head, seed: int) -> None:
    """A head with large random weights, so that candidates' scores of a tiny model spread well apart."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith("weight") else 0.0))


def make_engine(backbone: Backbone, artifacts: Path, catalogs: Catalogs, redis_url: str | None = None,
                **kw) -> Engine:
    """An engine over the checkpoints in `artifacts`, loaded by the service's own code."""
    cache = TokenCache(locked_encoder(backbone.tokenizer), backbone.tokenizer_fingerprint, redis_url,
                       timeout_s=0.05, retry_s=0.2)
    return Engine(backbone, load_models(artifacts, backbone), catalogs, cache, **kw)


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run ~10x faster on one thread than on two when the machine is shared; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def catalogs() -> Catalogs:
    return Catalogs.load(DOMAINS)


@pytest.fixture(scope="session")
def tiny_bb() -> Backbone:
    return tiny_backbone("bert")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_bb) -> Path:
    return save_artifacts(tmp_path_factory.mktemp("tiny-artifacts"), tiny_bb, top_k=1)


@pytest.fixture(scope="session")
def engine(tiny_bb, tiny_artifacts, catalogs) -> Engine:
    """The tiny in-process engine (fp32, CPU, no Redis)."""
    return make_engine(tiny_bb, tiny_artifacts, catalogs)


def app_settings(**kw) -> Settings:
    """Settings for in-process apps: fp32, no Redis unless given, short waits."""
    base = {"precision": "fp32", "device": "cpu", "redis_url": None, "batch_wait_ms": 2.0}
    return Settings(**{**base, **kw})


def wait_ready(client: TestClient, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"app not ready after {timeout} s: {client.get('/readyz').json()}")


@pytest.fixture
def client(engine) -> Iterator[TestClient]:
    """A ready in-process app over the tiny engine."""
    with TestClient(create_app(app_settings(), engine=engine)) as c:
        wait_ready(c)
        yield c


@contextlib.asynccontextmanager
async def serve_async(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan plus an async client on it, in the current event loop (for concurrency tests)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            for _ in range(3000):
                if (await c.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            yield c


# --- subprocess servers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_env(artifacts: Path, **env: str) -> dict[str, str]:
    base = {**os.environ, "XCROSS_ARTIFACTS": str(artifacts), "XCROSS_PRECISION": "fp32", "XCROSS_THREADS": "1",
            "XCROSS_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1",
            "XCROSS_RECALL_N": "0"}  # no text recall: embedding three real catalogs would cost minutes per start
    base.pop("REDIS_URL", None)
    return {**base, **env}


def start_server(env: dict[str, str], log: Path) -> Server:
    port = free_port()
    out = open(log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(proc, f"http://127.0.0.1:{port}", log)


def wait_server(server: Server, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}: {server.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"server not ready after {timeout} s: {server.log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def minilm_artifacts(tmp_path_factory, minilm) -> Path:
    """Freshly initialised checkpoints for the real MiniLM (random LoRAs with small non-zero B)."""
    return save_artifacts(tmp_path_factory.mktemp("minilm-artifacts"), minilm, top_k=2)


@pytest.fixture(scope="session")
def minilm_engine(minilm, minilm_artifacts, catalogs) -> Engine:
    """The direct model call for the subprocess servers' checkpoints (fp32, in this process)."""
    return make_engine(minilm, minilm_artifacts, catalogs)


def token_count(tokenizer, title: str) -> int:
    return len(encode_pieces(tokenizer, [title])[0])
