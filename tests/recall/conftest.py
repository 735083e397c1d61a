"""Recall fixtures: a hand-made two-domain catalog, smoke checkpoints trained by the CLI on the real data, and the
tiny X-Cross engine of tests/service (the app needs one; /recall does not use it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from model.recall.data import Catalog, Sequence
from tests.service.conftest import catalogs, engine, one_torch_thread, tiny_artifacts, tiny_bb  # noqa: F401
from training.recall import app as recall_cli

N_PER_DOMAIN = 20


@pytest.fixture
def toy_catalog() -> Catalog:
    """Items 1..20 in domain 0 ("a"), 21..40 in domain 1 ("b")."""
    item_domain = np.array([-1] + [0] * N_PER_DOMAIN + [1] * N_PER_DOMAIN)
    return Catalog(["a", "b"], item_domain, [None] + [f"item {i}" for i in range(1, 2 * N_PER_DOMAIN + 1)])


def toy_sequence(catalog: Catalog, items: list[int], ts: list[int]) -> Sequence:
    arr = np.asarray(items)
    return Sequence("u", arr, catalog.item_domain[arr], np.asarray(ts))


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> Path:
    """hstu, ddsr and gca trained with the smoke preset through the CLI; ddsr shipped to <root>/artifacts/recall."""
    root = tmp_path_factory.mktemp("recall")
    for variant in ("hstu", "ddsr", "gca"):
        res = CliRunner().invoke(recall_cli, ["train", "--dataset", "food-kitchen", "--variant", variant,
                                              "--preset", "smoke", "--quiet", "--results", str(root / "results"),
                                              "--runs", str(root / "runs"), "--artifacts",
                                              str(root / "artifacts" / "recall"),
                                              *(["--ship"] if variant == "ddsr" else [])])
        assert res.exit_code == 0, res.output
    return root
