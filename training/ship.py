"""Ship a retrained checkpoint set into the served artifacts, verified and consistent (issue 16).

    python -m training ship --from runs/wave2/artifacts --dry-run      # check only
    python -m training ship --from runs/wave2/artifacts                # swap it into artifacts/

A retrain is staged beside what is served (`python -m training all --artifacts runs/wave2/artifacts ...`) because
an X-Cross checkpoint names its source LoRAs by content hash: replacing one LoRA alone would leave the X-Cross
models built on it unloadable. Shipping moves whole kind directories (`lora/`, `xcross/`, `weaverec/`, `gca/`) from
the staging root into the served root, after checking that:
- every staged checkpoint has a readable manifest and files whose sha256 matches it (nothing half-written);
- after the swap, every served X-Cross / WeaveRec / GCA checkpoint (built-in and onboarded, `domains/<NAME>/`) finds
  each source LoRA it names by content hash.
Onboarded domains (training/onboard.py) were trained on the LoRAs that are being replaced: their old sources are
copied into `domains/<NAME>/sources/<D>-<hash12>/` first (the service searches `domains/` for sources by hash), so
they keep serving exactly the model that was evaluated, until they are re-onboarded on the new sources.
With `--keep-sources`, a served kind that is not staged (say the GCA models of an earlier wave, not retrained
yet) keeps serving too: the old LoRAs it names are copied into `<served>/sources/<D>-<hash12>/` (searched by hash
like `domains/`), so it stays exactly the model that was evaluated; without the flag such a set is refused. Kept
sources that no served checkpoint names any more (their models were retrained and shipped) move to the backup.
The replaced kind directories are kept under `<runs>/shipped/<timestamp>/` (the rollback: move them back), and
the served root is only changed by renames on one file system after everything was copied and checked. The service
picks the new set up with `POST /admin/reload` (or SIGHUP) without a restart.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import MANIFEST, CheckpointError, read_manifest, verify_files

log = logging.getLogger("training")
SHIPPED_KINDS = ("lora", "xcross", "weaverec", "gca")  # what `python -m training all` writes under <artifacts>/
ONBOARDED = "domains"  # service/loading.py ONBOARDED
KEPT = "sources"  # service/loading.py KEPT_SOURCES: old LoRAs kept for served models of an earlier ship


class ShipError(RuntimeError):
    """The staged set cannot be shipped; the message names the checkpoint and the fix. Nothing was changed."""


@dataclass
class Plan:
    kinds: list[str]  # kind directories replaced from the staging root
    checkpoints: dict[str, list[str]]  # kind -> staged domain names
    keep_sources: list[tuple[Path, Path]] = field(default_factory=list)  # (old LoRA dir, its copy to keep)
    prune_sources: list[Path] = field(default_factory=list)  # kept sources no served checkpoint names any more
    unchanged: list[str] = field(default_factory=list)  # kinds whose staged content is identical to what is served
    defaults: dict[str, str] = field(default_factory=dict)  # domain -> the kind serving it by default after the swap
    stale_defaults: list[str] = field(default_factory=list)  # domains whose default stays an unstaged (older) kind

    def summary(self) -> dict[str, Any]:
        return {"kinds": self.kinds, "checkpoints": self.checkpoints, "unchanged": self.unchanged,
                "sources_kept": [str(dst) for _, dst in self.keep_sources],
                "sources_retired": [str(d) for d in self.prune_sources], "defaults": self.defaults,
                "stale_defaults": self.stale_defaults}


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob(f"**/{MANIFEST}")) if root.is_dir() else []


def _hashes(root: Path) -> dict[str, Path]:
    out = {}
    for d in _checkpoints(root):
        try:
            out[read_manifest(d)["content_hash"]] = d
        except (CheckpointError, KeyError):
            continue
    return out


def _keep(p: Plan, src: Path, dst: Path) -> None:
    if (src, dst) not in p.keep_sources:
        p.keep_sources.append((src, dst))


def plan(staged: Path, served: Path, kinds: tuple[str, ...] = SHIPPED_KINDS, keep_sources: bool = False) -> Plan:
    """Check the staged set against the served root; raise ShipError naming what is wrong, else the plan.
    `keep_sources`: served kinds that are not staged keep their current source LoRAs (copied under sources/)."""
    if not staged.is_dir():
        raise ShipError(f"--from {staged}: no such directory (the staging root of `python -m training all "
                        f"--artifacts ...`)")
    if staged.resolve() == served.resolve():
        raise ShipError(f"--from {staged} is the served root itself; pass the staging root")
    present = [k for k in kinds if (staged / k).is_dir() and _checkpoints(staged / k)]
    if not present:
        raise ShipError(f"--from {staged}: no checkpoints under {', '.join(k + '/' for k in kinds)}; "
                        "has the retrain saved anything yet?")
    staged_ckpts: dict[str, list[str]] = {}
    for kind in present:
        for d in (p for p in sorted((staged / kind).iterdir()) if p.is_dir()):
            try:
                verify_files(d, read_manifest(d))
            except CheckpointError as exc:
                raise ShipError(f"staged checkpoint {d} is not shippable: {exc}") from exc
            staged_ckpts.setdefault(kind, []).append(d.name)
    # the served view after the swap: staged kinds replace served ones, other kinds stay
    after = {k: (staged if k in present else served) / k for k in SHIPPED_KINDS}
    lora_after = _hashes(after["lora"])
    old_lora = _hashes(served / "lora")
    kept = _hashes(served / KEPT)
    p = Plan(kinds=present, checkpoints=staged_ckpts)
    named: set[str] = set()  # source hashes the served checkpoints name after the swap
    for kind in SHIPPED_KINDS:
        for d in _checkpoints(after[kind]):
            for ref in read_manifest(d).get("sources", []):
                h = ref.get("content_hash")
                if h is None or h in lora_after:
                    continue
                named.add(h)
                if h in kept:
                    continue
                keepable = kind not in present and h in old_lora  # a served model not replaced, on a served LoRA
                if keepable and keep_sources:
                    _keep(p, old_lora[h], served / KEPT / f"{ref.get('domain')}-{h[:12]}")
                    continue
                where = "staged" if kind in present else "served (not staged)"
                hint = " or pass --keep-sources to keep serving it on a copy of its current sources" if keepable else ""
                raise ShipError(
                    f"{where} {kind} checkpoint {d} needs source LoRA {ref.get('domain')} {h[:12]}..., which is "
                    f"not among the LoRAs it would be served with; stage the {kind}/ models trained on the new "
                    f"LoRAs (or the LoRAs they were trained on) and ship them together{hint}")
    onboarded = served / ONBOARDED
    own = _hashes(onboarded)
    for d in _checkpoints(onboarded):
        if "sources" in d.relative_to(onboarded).parts:  # kept sources of earlier ships
            continue
        for ref in read_manifest(d).get("sources", []):
            h = ref.get("content_hash")
            named.add(h)
            if h in lora_after or h in own:
                continue
            if h not in old_lora:
                raise ShipError(f"onboarded checkpoint {d} needs source LoRA {ref.get('domain')} {str(h)[:12]}..., "
                                "which is served neither now nor after the swap; re-onboard that domain first")
            name = d.relative_to(onboarded).parts[0]
            _keep(p, old_lora[h], onboarded / name / "sources" / f"{ref.get('domain')}-{h[:12]}")
    p.prune_sources = [d for h, d in kept.items() if h not in named]
    p.unchanged = [k for k in present if (served / k).is_dir()
                   and sorted(_hashes(served / k)) == sorted(_hashes(staged / k))]
    p.defaults, p.stale_defaults = _defaults(after, staged_ckpts)
    return p


def _defaults(after: dict[str, Path], staged: dict[str, list[str]]) -> tuple[dict[str, str], list[str]]:
    """Each built-in domain's default kind after the swap (the service's order: xcross, weaverec, gca, lora), and
    the domains where a kind that was not staged (an earlier set's model, kept) outranks one that was: the service
    would keep serving the older model by default (say a first-wave weaverec/ over a retrained lora/)."""
    from service.loading import KINDS, default_kind

    kinds_of: dict[str, list[str]] = {}
    for kind in KINDS:
        for d in sorted(after[kind].iterdir()) if after[kind].is_dir() else []:
            if (d / MANIFEST).is_file():
                kinds_of.setdefault(d.name, []).append(kind)
    defaults, stale = {}, []
    for domain, kinds in sorted(kinds_of.items()):
        defaults[domain] = default = default_kind(kinds)
        fresh = [k for k in kinds if domain in staged.get(k, [])]
        if fresh and domain not in staged.get(default, []):
            stale.append(f"{domain}: {default}/ (not staged) stays the default over the staged "
                         f"{', '.join(k + '/' for k in fresh)}; stage a retrained {default}/{domain} too, or move "
                         f"{default}/{domain} out of the served root if the older model should not serve")
    return defaults, stale


def ship(staged: Path, served: Path, runs: Path, *, dry_run: bool = False,
         kinds: tuple[str, ...] = SHIPPED_KINDS, keep_sources: bool = False) -> dict[str, Any]:
    """Verify (plan), then copy the staged kinds beside the served root and swap them in by renames."""
    p = plan(staged, served, kinds, keep_sources)
    out = {"from": str(staged), "to": str(served), "dry_run": dry_run, **p.summary()}
    if dry_run:
        return out
    stamp = time.strftime("%Y%m%dT%H%M%S")
    tmp = served / f".ship-{stamp}"
    backup = runs / "shipped" / stamp
    try:
        for kind in p.kinds:
            shutil.copytree(staged / kind, tmp / kind)
            for d in (x for x in sorted((tmp / kind).iterdir()) if x.is_dir()):
                verify_files(d, read_manifest(d))  # the copy, not just the original
        for src, dst in p.keep_sources:
            if not dst.exists():
                shutil.copytree(src, tmp / "sources" / dst.relative_to(served))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # from here on only renames; the kept sources land first so they are never unresolvable
    for _, dst in p.keep_sources:
        staged_copy = tmp / "sources" / dst.relative_to(served)
        if staged_copy.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            staged_copy.rename(dst)
    backup.mkdir(parents=True, exist_ok=True)
    for kind in p.kinds:
        if (served / kind).exists():
            shutil.move(str(served / kind), str(backup / kind))  # a rename when runs/ shares the file system
        (tmp / kind).rename(served / kind)
    for d in p.prune_sources:
        (backup / KEPT).mkdir(parents=True, exist_ok=True)
        shutil.move(str(d), str(backup / KEPT / d.name))
    shutil.rmtree(tmp, ignore_errors=True)
    out["backup"] = str(backup)
    log.info("shipped %s from %s into %s (previous set in %s)", ", ".join(p.kinds), staged, served, backup)
    return out
