"""Backends (XCROSS_BACKEND): resolution, ONNX Runtime serving the same rankings as torch, int8, the export cache."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine import Engine
from service.loading import StartupError, build_runtime, load_models, resolve_backend
from service.schemas import RecommendRequest
from service.settings import SettingsError, load_settings

from .conftest import app_settings, wait_ready

REQ = {"domain": "Tools", "history": [{"id": 17}, {"id": 4}],
       "candidates": [{"id": i} for i in range(3, 33)], "top_k": 30}


def onnx_engine(engine: Engine, tiny_artifacts, tmp_path, backend: str) -> Engine:
    """What load_engine builds for an onnx backend: the grouped form exported, an OnnxRuntime over it."""
    settings = app_settings(artifacts=tiny_artifacts, onnx_cache=tmp_path / "onnx", backend=backend, precision="auto")
    models = load_models(tiny_artifacts, engine.backbone, streamwise=False)
    runtime = build_runtime(backend, models, settings, engine.backbone, "cpu")
    return Engine(engine.backbone, models, engine.catalogs, engine.cache, runtime=runtime)


def test_onnx_backend_serves_the_rankings_of_torch(engine, tiny_artifacts, tmp_path):
    onnx = onnx_engine(engine, tiny_artifacts, tmp_path, "onnx")
    want = engine.recommend(RecommendRequest.model_validate(REQ)).items
    with TestClient(create_app(app_settings(), engine=onnx)) as c:
        wait_ready(c)
        ready = c.get("/readyz").json()
        assert ready["backend"] == "onnx" and ready["runtime"] == "onnxruntime" and ready["precision"] == "fp32"
        got = c.post("/recommend", json=REQ).json()["items"]
        assert 'backend="onnx"' in c.get("/metrics").text
    assert [it["position"] for it in got] == [it.position for it in want]
    assert max(abs(g["score"] - w.score) for g, w in zip(got, want, strict=True)) < 1e-4


def test_int8_backend_runs(engine, tiny_artifacts, tmp_path):
    int8 = onnx_engine(engine, tiny_artifacts, tmp_path, "onnx-int8")
    assert int8.describe()["precision"] == "int8"
    out = int8.recommend(RecommendRequest.model_validate(REQ))
    assert len(out.items) == 30 and all(abs(it.score) < 1e6 for it in out.items)


def test_the_export_is_cached_by_checkpoint(engine, tiny_artifacts, tmp_path):
    onnx_engine(engine, tiny_artifacts, tmp_path, "onnx")
    files = sorted((tmp_path / "onnx").glob("*/model.onnx"))
    assert [f.parent.name.split("-")[0] for f in files] == ["Electronics", "Sports", "Tools"]
    stamps = [f.stat().st_mtime_ns for f in files]
    onnx_engine(engine, tiny_artifacts, tmp_path, "onnx")  # a restart reuses the exports
    assert [f.stat().st_mtime_ns for f in files] == stamps and not list((tmp_path / "onnx").glob("*/*.tmp"))


@pytest.mark.parametrize(("backend", "precision", "device", "flags", "expected"), [
    ("auto", "auto", "cpu", "avx512f amx_bf16 amx_tile", "torch-bf16"),
    ("auto", "auto", "cpu", "avx512f avx512_bf16", "torch-bf16"),
    ("auto", "auto", "cpu", "avx2 avx512f", "torch"),
    ("auto", "auto", "cuda", "", "torch-bf16"),
    ("auto", "fp32", "cpu", "amx_bf16", "torch"),
    ("auto", "bf16", "cpu", "", "torch-bf16"),
    ("onnx", "auto", "cuda", "", "onnx"),
    ("onnx-int8", "auto", "cpu", "", "onnx-int8"),
])
def test_backend_resolution(tmp_path, backend, precision, device, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    resolved, why = resolve_backend(backend, precision, device, cpuinfo)
    assert resolved == expected and why


def test_backend_conflicts_are_refused():
    with pytest.raises(StartupError, match="CPU only"):
        resolve_backend("onnx-int8", "auto", "cuda")
    with pytest.raises(SettingsError, match="XCROSS_PRECISION=bf16 contradicts XCROSS_BACKEND=onnx"):
        load_settings(backend="onnx", precision="bf16")
    assert load_settings(backend="torch-bf16", precision="bf16").backend == "torch-bf16"


def test_machine_description_reads_model_and_matmul_flags(tmp_path):
    from service.machine import cpu_bf16_flags, describe, tune_malloc

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU @ 2GHz\nflags\t\t: fpu avx2 avx512f amx_int8 amx_bf16\n")
    d = describe(cpuinfo)
    assert d["cpu"] == "Test CPU @ 2GHz" and d["flags"]["amx_bf16"] and not d["flags"]["avx512_bf16"]
    assert cpu_bf16_flags(cpuinfo) == ["amx_bf16"] and cpu_bf16_flags(tmp_path / "missing") == []
    assert tune_malloc() in (True, False) and tune_malloc() == tune_malloc()  # idempotent
