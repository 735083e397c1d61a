"""Shared fixtures: the real Redis (required, never skipped), tiny random backbones, the real MiniLM once."""

from __future__ import annotations

import os

import pytest

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_sessionstart(session: pytest.Session) -> None:
    import tempfile

    import redis

    # evaluation's frozen-prefix cache (training/prefix.py) in a throwaway directory, never the repository's runs/
    os.environ.setdefault("XCROSS_PREFIX_CACHE", tempfile.mkdtemp(prefix="xcross-prefix-"))

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        pytest.exit(
            f"Redis is unreachable at REDIS_URL={REDIS_URL} ({exc}). The suite needs a real Redis: start one with\n"
            "  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no\n"
            "or run `make test`, which starts a throwaway one when none answers at REDIS_URL.",
            returncode=3,
        )


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 backbone (loaded once per session)."""
    from model.backbone import load_backbone

    return load_backbone("minilm")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm):
    return minilm.tokenizer
