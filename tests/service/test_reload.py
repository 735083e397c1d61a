"""Serving an onboarded domain without a restart (issue 19): POST /admin/reload (auth: off without a token, 401,
403; constant-time compare), a reload under load with no failed request, the new domain's rankings, /readyz,
/docs and xcross_model_info at once, a broken new checkpoint refused while the old models keep serving, and the
catalog of an onboarded domain read from its artifact directory (no amazon-xcross data needed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.loading import find_all_checkpoints, load_catalogs
from tests.training.test_onboard import BACKBONE, garden, save_sources, write_csv
from training.onboard import onboard

from .conftest import app_settings, serve_async, wait_ready

TOKEN = "s3cret-token"


def settings(artifacts: Path, **kw):
    return app_settings(artifacts=artifacts, backbone=BACKBONE, recall_n=0, reload_grace_s=0.2, warmup=False, **kw)


def onboard_garden(tmp: Path, artifacts: Path, **kw) -> dict:
    items, users = garden()
    ip, ep = write_csv(tmp, items, users)
    return onboard("Garden", ip, ep, preset="smoke", artifacts=artifacts, runs=tmp / "runs", backbone=BACKBONE,
                   progress=False, echo=lambda *_: None, **kw)


def garden_request(**kw) -> dict:
    return {"domain": "Garden", "history": [{"asin": "G-0003"}, {"id": 7}, {"title": "a green garden hose"}],
            "candidates": [{"asin": f"G-{i:04d}"} for i in range(10, 20)], "top_k": 5, **kw}


SPORTS = {"domain": "Sports", "history": [{"id": 1}, {"id": 2}], "candidates": [{"id": i} for i in range(3, 9)]}


def test_admin_endpoint_off_without_token(tmp_path):
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts, ("Sports",))
    with TestClient(create_app(settings(artifacts))) as c:
        wait_ready(c)
        r = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404 and "XCROSS_ADMIN_TOKEN" in r.json()["message"]
        assert "/admin/reload" not in json.dumps(c.get("/openapi.json").json()["paths"])


def test_admin_auth(tmp_path):
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts, ("Sports",))
    with TestClient(create_app(settings(artifacts, admin_token=TOKEN))) as c:
        wait_ready(c)
        r = c.post("/admin/reload")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/admin/reload", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": "Bearer "}).status_code == 401
        r = c.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403 and r.json()["detail"][0]["msg"] == "wrong admin token"
        assert c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 403
        r = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["unchanged"] == ["Sports"] and r.json()["added"] == []


def test_onboarded_catalog_needs_no_data_dir(tmp_path):
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts)
    onboard_garden(tmp_path, artifacts)
    assert find_all_checkpoints(artifacts)["Garden"] == {"xcross": artifacts / "domains" / "Garden" / "xcross"}
    cats = load_catalogs(["Garden"], artifacts, tmp_path / "no-data-here")
    assert cats["Garden"].asins[3] == "G-0003" and cats["Garden"].titles[3] == "Garden & seed model 3 deluxe"


def test_reload_under_load_serves_new_domain_and_refuses_broken_checkpoint(tmp_path):
    artifacts = tmp_path / "artifacts"
    save_sources(artifacts)
    app = create_app(settings(artifacts, admin_token=TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def go():
        async with serve_async(app) as c:
            assert (await c.post("/recommend", json=garden_request())).status_code == 422  # not served yet
            before = (await c.get("/readyz")).json()
            assert "Garden" not in json.dumps(before)
            await asyncio.to_thread(onboard_garden, tmp_path, artifacts)
            statuses: list[int] = []
            done = asyncio.Event()

            async def load():
                while not done.is_set():
                    rs = await asyncio.gather(*(c.post("/recommend", json=SPORTS) for _ in range(4)))
                    statuses.extend(r.status_code for r in rs)

            workers = [asyncio.create_task(load()) for _ in range(2)]
            await asyncio.sleep(0.2)
            reload = await c.post("/admin/reload", headers=auth)
            await asyncio.sleep(0.5)  # past XCROSS_RELOAD_GRACE_S: the old batcher is closed by now
            done.set()
            await asyncio.gather(*workers)
            garden_r = await c.post("/recommend", json=garden_request())
            ready = await c.get("/readyz")
            doc = await c.get("/openapi.json")
            metrics = await c.get("/metrics")

            # a broken new checkpoint: refused, the old models keep serving
            ckpt = next((artifacts / "domains" / "Garden" / "xcross").glob("*.safetensors"))
            ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
            broken = await c.post("/admin/reload", headers=auth)
            still = await c.post("/recommend", json=garden_request())
            return reload, statuses, garden_r, ready, doc, metrics, broken, still

    reload, statuses, garden_r, ready, doc, metrics, broken, still = asyncio.run(go())
    assert reload.status_code == 200, reload.text
    body = reload.json()
    assert body["added"] == ["Garden"] and set(body["unchanged"]) == {"Sports", "Electronics"}
    assert body["models"]["Garden"].startswith("xcross@") and "Garden" in body["domains"]
    assert len(statuses) >= 8 and set(statuses) == {200}, statuses  # no failed request across the swap
    assert garden_r.status_code == 200, garden_r.text
    items = garden_r.json()["items"]
    assert [it["rank"] for it in items] == [1, 2, 3, 4, 5] and all(it["asin"].startswith("G-") for it in items)
    assert garden_r.json()["model"].startswith("xcross:Garden@")
    assert [it["score"] for it in items] == sorted((it["score"] for it in items), reverse=True)
    assert "Garden" in json.dumps(ready.json())
    assert '"Garden"' in doc.text
    assert 'xcross_model_info{' in metrics.text and 'domain="Garden"' in metrics.text
    assert broken.status_code == 409
    msg = broken.json()["detail"][0]["msg"]
    assert "reload refused, still serving the previous models" in msg and "Garden" in msg
    assert broken.json()["models"]["Garden"] == body["models"]["Garden"]
    assert still.status_code == 200 and still.json()["items"] == items


def test_sighup_reloads_a_running_server(tmp_path):
    """`python -m service` on the tiny backbone: SIGHUP loads the newly onboarded domain without a restart."""
    import signal
    import time

    import httpx

    from .conftest import server_env, start_server, wait_server

    artifacts = tmp_path / "artifacts"
    save_sources(artifacts)
    server = start_server(server_env(artifacts, XCROSS_BACKBONE=BACKBONE, XCROSS_LOG_LEVEL="info",
                                     XCROSS_RELOAD_GRACE_S="0.2"), tmp_path / "server.log")
    try:
        wait_server(server)
        assert httpx.post(server.url + "/recommend", json=garden_request()).status_code == 422
        assert httpx.post(server.url + "/admin/reload").status_code == 404  # no XCROSS_ADMIN_TOKEN: off
        onboard_garden(tmp_path, artifacts)
        server.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 60
        while time.monotonic() < end and "Garden" not in httpx.get(server.url + "/readyz").text:
            assert server.proc.poll() is None, server.log.read_text()[-2000:]
            time.sleep(0.2)
        r = httpx.post(server.url + "/recommend", json=garden_request())
        assert r.status_code == 200, r.text
        assert r.json()["model"].startswith("xcross:Garden@") and len(r.json()["items"]) == 5
        assert server.proc.poll() is None and "reload 1 in" in server.log.read_text()
    finally:
        server.stop()
