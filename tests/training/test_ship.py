"""`python -m training ship`: a staged retrain swapped into the served root only when verified and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model.checkpoint import _write, read_manifest, resolve_source
from training.__main__ import app
from training.ship import ShipError, plan, ship


def _lora(d: Path, domain: str, value: float) -> str:
    _write(d, {"a": torch.full((2, 2), value)}, {"kind": "lora", "domain": domain})
    return read_manifest(d)["content_hash"]


def _xcross(d: Path, target: str, sources: dict[str, str], value: float = 0.0) -> None:
    refs = [{"domain": s, "content_hash": h, "path": f"../../lora/{s}"} for s, h in sources.items()]
    _write(d, {"w": torch.full((3,), value)}, {"kind": "xcross", "target": target, "sources": refs})


def _set(root: Path, value: float) -> dict[str, str]:
    """A consistent set: LoRAs for Tools/Toys/Sports, X-Cross for Tools on Toys + Sports."""
    h = {d: _lora(root / "lora" / d, d, value + i) for i, d in enumerate(("Tools", "Toys", "Sports"))}
    _xcross(root / "xcross" / "Tools", "Tools", {"Toys": h["Toys"], "Sports": h["Sports"]}, value)
    return h


def _served_hashes(root: Path, kind: str) -> dict[str, str]:
    return {d.name: read_manifest(d)["content_hash"] for d in sorted((root / kind).iterdir())}


def test_ship_swaps_whole_kinds_and_keeps_a_backup(tmp_path: Path) -> None:
    served, staged, runs = tmp_path / "artifacts", tmp_path / "stage", tmp_path / "runs"
    old = _set(served, 1.0)
    (served / "recall").mkdir()  # kinds the retrain does not write stay untouched
    (served / "recall" / "keep.txt").write_text("x")
    new = _set(staged, 10.0)
    out = ship(staged, served, runs)
    assert out["kinds"] == ["lora", "xcross"]
    assert _served_hashes(served, "lora") == new
    assert _served_hashes(Path(out["backup"]), "lora") == old  # the rollback copy
    assert (served / "recall" / "keep.txt").read_text() == "x"
    assert not list(served.glob(".ship-*"))
    xc = served / "xcross" / "Tools"
    for ref in read_manifest(xc)["sources"]:  # the shipped X-Cross resolves its sources in the served root
        assert resolve_source(ref, xc, [served / "lora"]).resolve().parent == (served / "lora").resolve()


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    served, staged = tmp_path / "artifacts", tmp_path / "stage"
    old = _set(served, 1.0)
    _set(staged, 10.0)
    out = ship(staged, served, tmp_path / "runs", dry_run=True)
    assert out["dry_run"] and out["kinds"] == ["lora", "xcross"]
    assert _served_hashes(served, "lora") == old
    assert not (tmp_path / "runs").exists()


def test_loras_without_their_xcross_are_refused(tmp_path: Path) -> None:
    """Shipping new LoRAs alone would leave the served X-Cross (built on the old ones) unloadable."""
    served, staged = tmp_path / "artifacts", tmp_path / "stage"
    old = _set(served, 1.0)
    for i, d in enumerate(("Tools", "Toys", "Sports")):
        _lora(staged / "lora" / d, d, 20.0 + i)
    with pytest.raises(ShipError, match=r"served \(not staged\) xcross checkpoint .*Tools needs source LoRA Toys"):
        ship(staged, served, tmp_path / "runs")
    assert _served_hashes(served, "lora") == old


def test_corrupt_staged_checkpoint_is_refused(tmp_path: Path) -> None:
    served, staged = tmp_path / "artifacts", tmp_path / "stage"
    _set(served, 1.0)
    _set(staged, 10.0)
    f = staged / "lora" / "Toys" / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-7])  # a truncated copy
    with pytest.raises(ShipError, match=r"lora/Toys is not shippable: .*sha256"):
        plan(staged, served)
    (staged / "xcross" / "Tools" / "manifest.json").unlink()  # an interrupted save: no manifest
    f.write_bytes(b"")
    with pytest.raises(ShipError, match="not shippable"):
        plan(staged, served)


def test_onboarded_domain_keeps_its_old_sources(tmp_path: Path) -> None:
    served, staged = tmp_path / "artifacts", tmp_path / "stage"
    old = _set(served, 1.0)
    onb = served / "domains" / "Garden"
    onb.mkdir(parents=True)
    (onb / "catalog.jsonl").write_text(json.dumps({"id": 0, "asin": "g0", "title": "rake"}) + "\n")
    _xcross(onb / "xcross", "Garden", {"Tools": old["Tools"], "Toys": old["Toys"]})
    _set(staged, 10.0)
    out = ship(staged, served, tmp_path / "runs")
    assert sorted(Path(p).name for p in out["sources_kept"]) == [
        f"Tools-{old['Tools'][:12]}", f"Toys-{old['Toys'][:12]}"]
    for ref in read_manifest(onb / "xcross")["sources"]:  # found the way the service looks (domains/ searched)
        found = resolve_source(ref, onb / "xcross", [served / "lora", served / "domains"])
        assert found.resolve().parent == (onb / "sources").resolve()
    assert plan(staged, served).keep_sources == []  # a second ship needs no further copies


def test_keep_sources_keeps_an_unstaged_kind_serving_until_it_is_retrained(tmp_path: Path) -> None:
    """gca/ of an earlier wave is not retrained yet: refused by default; with keep_sources its old LoRAs are copied
    under sources/, and the ship that brings its retrained version retires them to the backup."""
    served, staged, runs = tmp_path / "artifacts", tmp_path / "stage", tmp_path / "runs"
    old = _set(served, 1.0)
    _write(served / "gca" / "Tools", {"g": torch.ones(2)}, {"kind": "gca", "target": "Tools", "sources": [
        {"domain": s, "content_hash": old[s], "path": f"../../lora/{s}"} for s in ("Toys", "Sports")]})
    _set(staged, 10.0)
    with pytest.raises(ShipError, match=r"served \(not staged\) gca checkpoint .*pass --keep-sources"):
        ship(staged, served, runs)
    out = ship(staged, served, runs, keep_sources=True)
    assert sorted(Path(p).name for p in out["sources_kept"]) == [f"Sports-{old['Sports'][:12]}",
                                                                 f"Toys-{old['Toys'][:12]}"]
    gca = served / "gca" / "Tools"
    for ref in read_manifest(gca)["sources"]:  # found the way the service looks (sources/ searched)
        assert resolve_source(ref, gca, [served / "lora", served / "sources"]).parent == served / "sources"
    assert plan(staged, served).keep_sources == []  # kept: a second ship needs neither copies nor the flag

    later = tmp_path / "stage2"
    new = _set(later, 20.0)
    _write(later / "gca" / "Tools", {"g": torch.zeros(2)}, {"kind": "gca", "target": "Tools", "sources": [
        {"domain": s, "content_hash": new[s], "path": f"../../lora/{s}"} for s in ("Toys", "Sports")]})
    out = ship(later, served, runs)
    assert out["kinds"] == ["lora", "xcross", "gca"] and len(out["sources_retired"]) == 2
    assert not list((served / "sources").iterdir())
    assert sorted(d.name for d in (Path(out["backup"]) / "sources").iterdir()) == sorted(
        Path(p).name for p in out["sources_retired"])


def test_cli_reports_and_fails_with_exit_code(tmp_path: Path) -> None:
    served, staged = tmp_path / "artifacts", tmp_path / "stage"
    _set(served, 1.0)
    _set(staged, 10.0)
    runner = CliRunner()
    r = runner.invoke(app, ["ship", "--from", str(staged), "--to", str(served), "--runs", str(tmp_path / "runs"),
                            "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "lora: Sports, Tools, Toys" in r.output and "--dry-run" in r.output
    r = runner.invoke(app, ["ship", "--from", str(tmp_path / "nowhere"), "--to", str(served)])
    assert r.exit_code == 1 and "no such directory" in r.output


def test_an_unstaged_kind_that_outranks_a_staged_one_is_reported_as_a_stale_default(tmp_path: Path) -> None:
    """The service serves a domain by its first kind in xcross, weaverec, gca, lora order: an earlier wave's
    weaverec/Sports kept beside a retrained lora/Sports would stay Sports' default. The plan names it; a domain whose
    default is staged (Tools: xcross) is not named."""
    served, staged, runs = tmp_path / "artifacts", tmp_path / "stage", tmp_path / "runs"
    old = _set(served, 1.0)
    _write(served / "weaverec" / "Sports", {"m": torch.ones(2)}, {"kind": "weaverec", "target": "Sports",
           "sources": [{"domain": "Sports", "content_hash": old["Sports"], "path": "../../lora/Sports"}]})
    _set(staged, 10.0)
    p = plan(staged, served, keep_sources=True)
    assert p.defaults == {"Sports": "weaverec", "Tools": "xcross", "Toys": "lora"}
    assert len(p.stale_defaults) == 1 and p.stale_defaults[0].startswith("Sports: weaverec/ (not staged)")
    assert "lora/" in p.stale_defaults[0]
    runner = CliRunner()
    r = runner.invoke(app, ["ship", "--from", str(staged), "--to", str(served), "--runs", str(runs), "--dry-run",
                            "--keep-sources"])
    assert r.exit_code == 0, r.output
    assert "Sports: weaverec, Tools: xcross, Toys: lora" in r.output and "warning: Sports: weaverec/" in r.output
    _write(staged / "weaverec" / "Sports", {"m": torch.zeros(2)}, {"kind": "weaverec", "target": "Sports",
           "sources": [{"domain": "Sports", "content_hash": _served_hashes(staged, "lora")["Sports"],
                        "path": "../../lora/Sports"}]})
    assert plan(staged, served).stale_defaults == []  # retrained too: the default is the staged one
