"""Deployment files, read with a YAML parser (no Docker engine here): services, ports, healthchecks, the GPU
reservation and its CPU override, Redis without persistence, Prometheus scraping the api; the README's settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings, env_name

from .conftest import REPO

RESET = object()  # compose's `!reset`: drop the key from the merged file


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus compose's `!reset` tag."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load(name: str) -> dict[str, Any]:
    return yaml.load((REPO / name).read_text(), Loader=ComposeLoader)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file (mappings merge, `!reset` removes, other values replace)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if v is RESET:
                out.pop(k, None)
            else:
                out[k] = merge(base.get(k), v)
        return out
    return override


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("docker-compose.yml")


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_services_ports_and_healthchecks(compose):
    services = compose["services"]
    assert set(services) == {"lb", "api", "redis", "prometheus"}
    assert services["lb"]["ports"] == ["${XCROSS_API_PORT:-8000}:8000"]
    assert "ports" not in services["api"] and services["api"]["expose"] == ["8000"]  # replicas sit behind lb
    assert services["prometheus"]["ports"] == ["9090:9090"]
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_api_reserves_a_gpu(compose):
    devices = gpu_devices(compose["services"]["api"])
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_redis_is_a_cache_without_persistence(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    assert "volumes" not in redis


def test_prometheus_scrapes_the_api_service(compose):
    prom = compose["services"]["prometheus"]
    mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((REPO / mount.split(":")[0]).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
    targets += [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    api_port = compose["services"]["api"]["expose"][0]
    assert targets == [f"api:{api_port}"]  # the compose service name and its container port


def test_cpu_override_drops_the_gpu_and_uses_the_cpu_image(compose):
    merged = merge(compose, load("docker-compose.cpu.yml"))
    api = merged["services"]["api"]
    assert gpu_devices(api) == [] and "deploy" not in api
    assert api["build"]["dockerfile"] == "docker/Dockerfile.cpu" and api["environment"]["XCROSS_DEVICE"] == "cpu"
    assert api["environment"]["REDIS_URL"] == "redis://redis:6379/0"  # the rest is kept
    assert set(merged["services"]) == {"lb", "api", "redis", "prometheus"}


def test_the_balancer_runs_the_tested_haproxy_config_in_front_of_the_replicas(compose):
    """lb mounts docker/haproxy.cfg (the file test_balancer.py runs) and its compose branch finds the replicas by
    DNS; the api's drain fits in its stop grace period and outlasts lb's health checks."""
    lb, api = compose["services"]["lb"], compose["services"]["api"]
    assert lb["image"].startswith("haproxy:")
    mount = next(v for v in lb["volumes"] if v.endswith(":/usr/local/etc/haproxy/haproxy.cfg:ro"))
    assert (REPO / mount.split(":")[0]).resolve() == REPO / "docker" / "haproxy.cfg"
    assert lb["environment"]["XCROSS_LB_BIND"] == ":" + lb["ports"][0].rsplit(":", 1)[1]
    assert "/lb-healthz" in " ".join(lb["healthcheck"]["test"]) and "api" in lb["depends_on"]
    cfg = (REPO / "docker" / "haproxy.cfg").read_text()
    for line in ("option httpchk", "http-check send meth GET uri /readyz", "http-check expect status 200",
                 "retries 3", "option redispatch 1", "retry-on conn-failure empty-response 503",
                 "option http-buffer-request", 'bind "${XCROSS_LB_BIND-:8000}"', "monitor-uri /lb-healthz",
                 f"server-template api 1-8 api:{api['expose'][0]} resolvers docker init-addr none",
                 "nameserver dns 127.0.0.11:53"):
        assert line in cfg, line
    inter = float(re.search(r'inter "\$\{XCROSS_LB_CHECK_INTER-(\d+)s\}" fall (\d+)', cfg).group(1))
    fall = int(re.search(r"inter \S+ fall (\d+)", cfg).group(1))
    check_timeout = float(re.search(r"timeout check (\d+)s", cfg).group(1))
    env = api["environment"]
    drain, graceful = float(env["XCROSS_DRAIN_S"]), float(env["XCROSS_GRACEFUL_TIMEOUT_S"])
    assert fall * inter + check_timeout < drain < graceful  # out of rotation before the replica stops accepting
    assert float(api["stop_grace_period"].removesuffix("s")) > graceful  # compose's SIGKILL comes after the exit


@pytest.mark.parametrize(("dockerfile", "base", "extra"), [("docker/Dockerfile", "nvidia/cuda:", ".[gpu]"),
                                                           ("docker/Dockerfile.cpu", "python:3.11", ".[cpu]")])
def test_dockerfiles(dockerfile, base, extra):
    text = (REPO / dockerfile).read_text()
    images = re.findall(r"^(?:ARG CUDA_IMAGE=|FROM )(\S+)", text, flags=re.M)
    assert any(i.startswith(base) for i in images), images
    assert f'pip install "{extra}"' in text and "torch==" in text
    assert 'CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "USER xcross" in text and "COPY artifacts artifacts" in text
    for path in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        assert (REPO / path).exists() or path == "artifacts", path


def test_the_service_page_documents_every_setting():
    page = (REPO / "docs" / "service.md").read_text()
    missing = [env_name(f) for f in Settings.model_fields if f"`{env_name(f)}`" not in page]
    assert not missing, f"docs/service.md 'Settings' lacks {missing}"
    for name in ("xcross_requests_total", "xcross_forward_prompts", "xcross_token_cache_events_total",
                 "/recommend", "/readyz"):
        assert name in page
    assert "docker-compose.cpu.yml" in (REPO / "docs" / "deployment.md").read_text()
    readme = (REPO / "README.md").read_text()
    assert "docs/service.md" in readme and "docs/deployment.md" in readme


def test_ci_is_make_test_and_make_test_sets_up_promtool_haproxy_and_redis():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == "exec make test" and not any("apt-get" in line or "redis" in line for line in ci), ci
    setup = (REPO / "scripts" / "test_setup.sh").read_text()
    for need in ("_setup_need promtool prometheus", "_setup_need haproxy haproxy",
                 "_setup_need redis-server redis-server"):
        assert need in setup
    assert "scripts/run_tests.sh" in (REPO / "Makefile").read_text()


def test_settings_defaults_match_the_design(monkeypatch):
    import os

    for var in [v for v in os.environ if v.startswith("XCROSS_")]:
        monkeypatch.delenv(var)
    s = Settings()
    assert (s.batch_prompts, s.max_history, s.max_candidates, s.max_title_chars, s.max_body_bytes) == (
        30, 50, 1000, 512, 1 << 20)
    assert Path(s.artifacts) == REPO / "artifacts"
