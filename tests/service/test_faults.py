"""Faults in-process: Redis killed in the middle of a load; bad settings and missing checkpoints at start."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid

import pytest
import redis

from bench.loadtest import same_ranking
from service.__main__ import main
from service.app import create_app
from service.schemas import RecommendRequest

from .conftest import app_settings, free_port, make_engine, serve_async
from .test_metrics import value

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def spare_redis(tmp_path):
    """A redis-server of our own on a free port, so that killing it disturbs nobody."""
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_redis_killed_during_a_load_answers_keep_coming_and_stay_correct(spare_redis, engine, tiny_bb,
                                                                         tiny_artifacts, catalogs):
    proc, url = spare_redis
    served = make_engine(tiny_bb, tiny_artifacts, catalogs, redis_url=url)
    app = create_app(app_settings(redis_url=url, warmup=False), engine=served)
    run = uuid.uuid4().hex[:8]
    payloads = [{"domain": ("Tools", "Sports")[i % 2], "history": [{"id": i}, {"title": f"old thing {run} {i}"}],
                 "candidates": [{"id": 7 * i + k} for k in range(5)] + [{"title": f"new thing {run} {i} {k}"}
                                                                        for k in range(3)],
                 "top_k": 8} for i in range(48)]
    expected = [engine.recommend(RecommendRequest.model_validate(p)).model_dump()["items"] for p in payloads]
    answers: list = [None] * len(payloads)
    snapshots = {}

    async def go():
        async with serve_async(app) as c:
            todo = iter(range(len(payloads)))
            done = 0

            async def client():
                nonlocal done
                for i in todo:
                    answers[i] = await c.post("/recommend", json=payloads[i])
                    done += 1
                    if done == 16:
                        snapshots["before"] = (await c.get("/metrics")).text
                        proc.kill()  # Redis dies while requests are in flight
                        proc.wait()

            await asyncio.gather(*(client() for _ in range(4)))
            snapshots["after"] = (await c.get("/metrics")).text
            snapshots["readyz"] = (await c.get("/readyz")).json()

    asyncio.run(go())
    served.close()
    for i, (r, want) in enumerate(zip(answers, expected, strict=True)):
        assert r.status_code == 200, (i, r.text)
        assert same_ranking(r.json()["items"], want, tol=1e-5) is None, i
    before, after = snapshots["before"], snapshots["after"]
    assert value(before, "xcross_token_cache_events_total", tier="redis", event="miss") > 0  # Redis was in use
    assert value(before, "xcross_token_cache_events_total", tier="redis", event="fallback") == 0
    assert value(after, "xcross_token_cache_events_total", tier="redis", event="fallback") >= 3 * 16
    assert value(after, "xcross_redis_errors_total") >= 1
    assert snapshots["readyz"]["ready"] is True and snapshots["readyz"]["redis"].startswith("down")


def test_a_bad_setting_exits_2_with_one_line_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("XCROSS_BATCH_PROMPTS", "0")
    monkeypatch.setenv("XCROSS_DEVICE", "gpu")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xcross-serve: cannot start: invalid settings:")
    assert "XCROSS_BATCH_PROMPTS='0'" in err and "XCROSS_DEVICE='gpu'" in err


def test_no_checkpoints_exits_2_unless_allowed(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XCROSS_ARTIFACTS", str(tmp_path))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoints under {tmp_path}" in err and "XCROSS_ALLOW_EMPTY=1" in err and err.count("\n") == 1
