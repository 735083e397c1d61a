"""Onboard a new domain from its own files (issue 19, DESIGN 10): validate -> split -> zero-shot source choice ->
X-Cross -> evaluation -> one artifact directory the service serves without `../shared/data`.

    python -m training onboard --domain Garden --items garden_items.csv --interactions garden_events.csv

Inputs
  items         JSON Lines `{"asin": "<any string key>", "title": "..."}` or CSV with columns `asin,title`;
                ids are assigned by the tool in file order. Titles are normalised as the released catalogs' are
                (HTML-unescaped, whitespace collapsed) and cut to 8 words; an empty title or one over
                `MAX_TITLE_CHARS` characters is an error.
  interactions  JSON Lines `{"user": "...", "items": [key, ...]}` in time order, or CSV `user,item,timestamp`
                (unix seconds or ISO 8601; sorted by the tool, one interaction per user and UTC day: the first of
                the day, as the paper's data keeps one per day). Histories are cut to the most recent 15 items;
                users with fewer than 2 interactions are skipped and counted (not an error).
Every error names the file, the line and the field, and nothing is written.

Protocol (the paper's, on the user's data): users split seeded into test (10%, at most 1,000) and train; the
train users' validation split (`training.data.split_train_val`, 10%) is used for the zero-shot choice of the two
best sources among `artifacts/lora/*` (and onboarded domains' own LoRAs) and for early stopping; evaluation users
get the target + 29 popularity negatives (train popularity). X-Cross is trained by `training.pipeline.train_xcross`
on the preset's `xcross` config; the test table compares it with every source zero-shot and the embedding floor
(paired two-sided t-test on the same test users).

Output: `<artifacts>/domains/<NAME>/` = `catalog.jsonl` (id, asin, title, train popularity), `xcross/` (the
checkpoint, safetensors + manifest), `lora/` with `--with-lora`, `onboard.json` (the report). It is written to a
temporary directory beside it and renamed into place, so a crash or Ctrl-C leaves the previous state intact. The
training state lives under `<runs>/onboard-<NAME>-<hash of the inputs>/` and a re-run with the same inputs resumes it.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from model.prompts import normalize_title
from training.data import DOMAINS, N_CANDIDATES, Catalog, Domain, User, with_candidates

log = logging.getLogger("training")

MAX_TITLE_CHARS = 512  # the service's title limit (XCROSS_MAX_TITLE_CHARS default)
MAX_TITLE_WORDS = 8  # the released data's cut
MAX_HISTORY = 15  # items per user kept (the most recent), as the paper's data
MIN_USERS = 10  # usable users (>= 2 interactions) needed for a train / validation / test split
TEST_FRACTION = 0.1
MAX_TEST = 1000
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
SERVED_KINDS = ("xcross", "weaverec", "gca", "lora")


class OnboardError(ValueError):
    """Bad input: the message names the file, the line and the field."""


@dataclass
class OnboardData:
    name: str
    catalog: Catalog
    users: list[User]  # chronological item ids, at most MAX_HISTORY, >= 2 each
    skipped_users: int = 0  # users with fewer than 2 interactions
    dropped_same_day: int = 0  # CSV interactions beyond the first of a user's day
    cut_histories: int = 0  # users whose history was cut to the most recent MAX_HISTORY
    digest: str = ""  # sha1 of the validated data (names the resumable run)
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading and validation


def _fmt(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise OnboardError(f"{path}: unknown format {suffix!r}; use .jsonl (JSON Lines) or .csv")


def _rows(path: Path, required: tuple[str, ...]):
    """(line number, row dict) of a JSON Lines or CSV file; a missing required field is an error."""
    if not path.is_file():
        raise OnboardError(f"{path}: no such file")
    if _fmt(path) == "jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise OnboardError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise OnboardError(f"{path}:{line_no}: expected a JSON object with {', '.join(required)}")
                for key in required:
                    if key not in row:
                        raise OnboardError(f"{path}:{line_no}: field {key!r} missing")
                yield line_no, row
        return
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in required if k not in (reader.fieldnames or [])]
        if missing:
            raise OnboardError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)} "
                               f"(header: {','.join(reader.fieldnames or [])})")
        for row in reader:
            line_no = reader.line_num
            for key in required:
                if row.get(key) is None:
                    raise OnboardError(f"{path}:{line_no}: field {key!r} missing")
            yield line_no, row


def clean_title(raw: Any, where: str) -> str:
    """A catalog title as the released data has it: unescaped, whitespace-normalised, cut to 8 words."""
    if raw is not None and not isinstance(raw, str):
        raise OnboardError(f"{where}: field 'title' must be a string, got {type(raw).__name__}")
    if raw is not None and len(raw) > MAX_TITLE_CHARS:
        raise OnboardError(f"{where}: field 'title' is {len(raw)} characters; at most {MAX_TITLE_CHARS}")
    title = normalize_title(raw, "")
    if not title:
        raise OnboardError(f"{where}: field 'title' is empty (after HTML-unescaping and whitespace normalisation)")
    return " ".join(title.split(" ")[:MAX_TITLE_WORDS])


def read_items(path: Path, name: str) -> Catalog:
    titles: list[str] = []
    asins: list[str] = []
    seen: dict[str, int] = {}
    for line_no, row in _rows(path, ("asin", "title")):
        where = f"{path}:{line_no}"
        key = row["asin"]
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not key.strip():
            raise OnboardError(f"{where}: field 'asin' must be a non-empty string key")
        key = key.strip()
        if key in seen:
            raise OnboardError(f"{where}: field 'asin': duplicate key {key!r} (first at line {seen[key]})")
        seen[key] = line_no
        titles.append(clean_title(row["title"], where))
        asins.append(key)
    if len(titles) < N_CANDIDATES:
        raise OnboardError(f"{path}: {len(titles)} items; at least {N_CANDIDATES} are needed (the target + "
                           f"{N_CANDIDATES - 1} negatives per evaluated user)")
    return Catalog(name, titles, asins)


def _timestamp(raw: str, where: str) -> float:
    raw = (raw or "").strip()
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise OnboardError(f"{where}: field 'timestamp' {raw[:40]!r} is neither unix seconds nor ISO 8601") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def _item_id(key: Any, catalog: Catalog, where: str, fld: str, items_path: Path) -> int:
    k = str(key).strip() if isinstance(key, (str, int)) and not isinstance(key, bool) else None
    idx = catalog.asin_to_id.get(k) if k is not None else None
    if idx is None:
        raise OnboardError(f"{where}: field {fld!r}: unknown item key {str(key)[:64]!r} (not an asin of "
                           f"{items_path})")
    return idx


def read_interactions(path: Path, catalog: Catalog, items_path: Path) -> tuple[list[User], dict[str, int]]:
    """Chronological users (>= 2 interactions, the most recent MAX_HISTORY) and counts of what was dropped."""
    counts = {"skipped_users": 0, "dropped_same_day": 0, "cut_histories": 0, "interactions": 0}
    seqs: dict[str, list[int]] = {}
    if _fmt(path) == "jsonl":
        first_line: dict[str, int] = {}
        for line_no, row in _rows(path, ("user", "items")):
            where = f"{path}:{line_no}"
            user = row["user"]
            if not isinstance(user, (str, int)) or isinstance(user, bool) or not str(user).strip():
                raise OnboardError(f"{where}: field 'user' must be a non-empty string")
            user = str(user).strip()
            if user in first_line:
                raise OnboardError(f"{where}: field 'user': {user!r} appears again (first at line "
                                   f"{first_line[user]}); give one line per user")
            first_line[user] = line_no
            if not isinstance(row["items"], list):
                raise OnboardError(f"{where}: field 'items' must be a list of item keys in time order")
            seqs[user] = [_item_id(k, catalog, where, f"items[{i}]", items_path) for i, k in enumerate(row["items"])]
            counts["interactions"] += len(seqs[user])
    else:
        events: dict[str, list[tuple[float, int, int]]] = {}
        for line_no, row in _rows(path, ("user", "item", "timestamp")):
            where = f"{path}:{line_no}"
            user = (row["user"] or "").strip()
            if not user:
                raise OnboardError(f"{where}: field 'user' is empty")
            item = _item_id(row["item"], catalog, where, "item", items_path)
            events.setdefault(user, []).append((_timestamp(row["timestamp"], where), line_no, item))
            counts["interactions"] += 1
        for user, evs in events.items():
            evs.sort()
            days, seq = set(), []
            for ts, _, item in evs:
                day = datetime.fromtimestamp(ts, tz=UTC).date()
                if day in days:
                    counts["dropped_same_day"] += 1
                    continue
                days.add(day)
                seq.append(item)
            seqs[user] = seq
    users = []
    for user, seq in seqs.items():
        if len(seq) < 2:
            counts["skipped_users"] += 1
            continue
        if len(seq) > MAX_HISTORY:
            counts["cut_histories"] += 1
            seq = seq[-MAX_HISTORY:]
        users.append(User(user, tuple(seq)))
    if len(users) < MIN_USERS:
        raise OnboardError(f"{path}: {len(users)} users with at least 2 interactions "
                           f"({counts['skipped_users']} skipped with fewer); at least {MIN_USERS} are needed")
    worst = max(len(set(u.items)) for u in users)
    if len(catalog) - worst < N_CANDIDATES - 1:
        raise OnboardError(f"{items_path}: {len(catalog)} items, but a user has {worst} distinct items: "
                           f"{N_CANDIDATES - 1} negatives per user need at least {worst + N_CANDIDATES - 1} items")
    return users, counts


def served_domains(artifacts: Path) -> set[str]:
    """Domains the service would serve from `artifacts` (built-in kind directories and onboarded domains)."""
    names = set()
    for kind in SERVED_KINDS:
        root = artifacts / kind
        names |= {d.name for d in root.iterdir() if d.is_dir()} if root.is_dir() else set()
    root = artifacts / "domains"
    names |= {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")} if root.is_dir() else set()
    return names


def check_name(name: str, artifacts: Path, replace: bool) -> None:
    if not NAME_RE.match(name):
        raise OnboardError(f"--domain {name!r}: use a letter then letters, digits, '_' or '-' (at most 64)")
    if name in DOMAINS or any((artifacts / kind / name).is_dir() for kind in SERVED_KINDS):
        raise OnboardError(f"--domain {name!r} is a built-in served domain (artifacts/<kind>/{name}); "
                           "pick another name (--replace only replaces onboarded domains)")
    if (artifacts / "domains" / name).is_dir() and not replace:
        raise OnboardError(f"--domain {name!r} is already served from {artifacts / 'domains' / name}; pass "
                           "--replace to retrain and replace it, or pick another name")


def validate(name: str, items: Path, interactions: Path, artifacts: Path, replace: bool = False) -> OnboardData:
    """Everything about the input that can be wrong, before anything is trained or written."""
    check_name(name, artifacts, replace)
    catalog = read_items(Path(items), name)
    users, counts = read_interactions(Path(interactions), catalog, Path(items))
    users.sort(key=lambda u: u.user)  # the same users split the same way from CSV or JSON Lines
    h = hashlib.sha1()
    for t, a in zip(catalog.titles, catalog.asins, strict=True):
        h.update(f"{a}\t{t}\n".encode())
    for u in users:
        h.update(f"{u.user}\t{','.join(map(str, u.items))}\n".encode())
    return OnboardData(name, catalog, users, counts["skipped_users"], counts["dropped_same_day"],
                       counts["cut_histories"], h.hexdigest()[:12],
                       {"items": len(catalog), "users": len(users), **counts})


# ----------------------------------------------------------------------------- split, sources, training


def split_users(users: list[User], seed: int = 0) -> tuple[list[User], list[User]]:
    """(train + validation users, test users): a seeded TEST_FRACTION of the users (at least 1) is held out."""
    order = np.random.default_rng([seed, 19]).permutation(len(users))
    n_test = max(1, min(MAX_TEST, int(round(len(users) * TEST_FRACTION))))
    test_idx = set(order[:n_test].tolist())
    return ([u for i, u in enumerate(users) if i not in test_idx], [users[i] for i in sorted(test_idx)])


def popularity(users: list[User], n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.int64)
    for u in users:
        np.add.at(counts, list(u.items), 1)
    return counts


def available_sources(artifacts: Path, exclude: str) -> dict[str, Path]:
    """Source LoRAs to choose from: artifacts/lora/<D>/ and onboarded domains' own artifacts/domains/<D>/lora/."""
    found = {}
    for d in sorted((artifacts / "lora").iterdir()) if (artifacts / "lora").is_dir() else []:
        if (d / "manifest.json").is_file() and d.name != exclude:
            found[d.name] = d
    for d in sorted((artifacts / "domains").iterdir()) if (artifacts / "domains").is_dir() else []:
        if (d / "lora" / "manifest.json").is_file() and d.name != exclude and not d.name.startswith("."):
            found.setdefault(d.name, d / "lora")
    return found


def make_context(preset: str, artifacts: Path, runs: Path, data: OnboardData, train_users: list[User],
                 test_users: list[User], backbone: str, seed: int, progress: bool, sources: dict[str, Path],
                 overrides: list[str] | None = None, tag: str | None = None):
    """A training Context whose domain `data.name` is the user's data (test users as its `dev`), and whose
    `paths.lora(<source>)` finds every available source (so `train_xcross` runs unchanged)."""
    from training.pipeline import Context, Paths
    from training.presets import get_preset

    class OnboardPaths(Paths):
        def lora(self, domain: str) -> Path:
            return sources.get(domain) or super().lora(domain)

    work = runs / f"onboard-{data.name}-{data.digest}"
    paths = OnboardPaths(artifacts=artifacts, results=work / "results", runs=work)
    ctx = Context(get_preset(preset, overrides or [], tag), paths, backbone_name=backbone, seed=seed,
                  progress=progress)
    pop = popularity(train_users, len(data.catalog))
    test = with_candidates(test_users, pop, seed=seed + 100)
    ctx._domains[data.name] = Domain(data.name, data.catalog, train_users, test, pop)
    _validate_every_epoch(ctx, data.name, overrides or [])
    return ctx


def _validate_every_epoch(ctx, name: str, overrides: list[str]) -> None:
    """A new domain is small: with the preset's `eval_every` (500 steps for `cpu`) X-Cross would be validated once,
    at the end, and nothing would be chosen on validation. Validate at least once per epoch instead, so the best
    epoch is kept and early stopping can act (unless `--set xcross.eval_every=...` asks otherwise)."""
    from dataclasses import replace

    xc = ctx.preset.xcross
    if any(o.split("=")[0].strip() in ("eval_every", "xcross.eval_every") for o in overrides):
        return
    per_epoch = max(1, -(-len(ctx.split(name, xc)[0]) // xc.users_per_step))
    if xc.eval_every > per_epoch:
        ctx.preset = replace(ctx.preset, xcross=replace(xc, eval_every=per_epoch),
                             overrides=(*ctx.preset.overrides, f"xcross.eval_every={per_epoch} (once per epoch)"))


def _metrics_row(name: str, res: dict, ref: dict | None) -> dict[str, Any]:
    from training.evaluate import paired_ttest

    row = {"model": name, **{k: round(v, 2) for k, v in res["metrics"].items() if k != "n_users"},
           "n_users": res["metrics"].get("n_users")}
    if ref is not None and ref is not res:
        t = paired_ttest(ref, res, "hit@1")
        row["xcross_minus_this_hit@1"], row["p_value"] = round(t["diff"], 2), round(t["p_value"], 4)
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<28} {'Hit@1':>6} {'Hit@3':>6} {'Hit@10':>6} {'MRR@10':>7} {'users':>6} "
            f"{'X-Cross-this':>12} {'p':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = f"{r['xcross_minus_this_hit@1']:+.2f}" if "xcross_minus_this_hit@1" in r else ""
        p = f"{r['p_value']:.3f}" if "p_value" in r else ""
        lines.append(f"{r['model']:<28} {r['hit@1']:>6.2f} {r['hit@3']:>6.2f} {r['hit@10']:>6.2f} "
                     f"{r['mrr@10']:>7.2f} {r['n_users']!s:>6} {diff:>12} {p:>7}")
    return "\n".join(lines)


def write_catalog(path: Path, catalog: Catalog, pop: np.ndarray) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (asin, title) in enumerate(zip(catalog.asins, catalog.titles, strict=True)):
            # escaped as the released items.jsonl are: read_catalog's unescape gives back exactly this title
            f.write(json.dumps({"id": i, "asin": asin, "title": html.escape(title, quote=False),
                                "popularity": int(pop[i])}) + "\n")


def install_atomic(tmp: Path, dest: Path) -> None:
    """Put the finished `tmp` directory at `dest`: a rename (atomic) when `dest` is new; when it exists, the old
    one is renamed aside first and removed after (a crash in between leaves it at `.<name>.old-*`, intact)."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError:
            old.rename(dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def onboard(name: str, items: Path, interactions: Path, *, preset: str = "cpu", artifacts: Path | None = None,
            runs: Path | None = None, sources: list[str] | None = None, dry_run: bool = False,
            replace: bool = False, with_lora: bool = False, backbone: str = "minilm", seed: int = 0,
            exclude_sources: list[str] | None = None,
            progress: bool = True, overrides: list[str] | None = None, tag: str | None = None,
            echo=print) -> dict[str, Any]:
    """The whole onboarding; returns the report (also written as onboard.json into the artifact)."""
    from model.checkpoint import load_model, read_manifest
    from training.evaluate import embedding_floor, evaluate_users
    from training.pipeline import REPO, score_checkpoint, train_lora, train_xcross

    t0 = time.perf_counter()
    artifacts = Path(artifacts or os.environ.get("XCROSS_ARTIFACTS") or REPO / "artifacts").resolve()
    runs = Path(runs or os.environ.get("XCROSS_RUNS") or REPO / "runs").resolve()
    data = validate(name, Path(items), Path(interactions), artifacts, replace)
    train_users, test_users = split_users(data.users, seed)
    avail = {s: p for s, p in available_sources(artifacts, exclude=name).items() if s not in (exclude_sources or ())}
    if sources:
        unknown = [s for s in sources if s not in avail]
        if unknown:
            raise OnboardError(f"--sources {','.join(unknown)}: no such source LoRA; available: "
                               f"{', '.join(avail) or 'none'}")
    elif len(avail) < 1:
        raise OnboardError(f"no source LoRAs under {artifacts / 'lora'}: train some first (python -m training "
                           "train-lora) or point --artifacts at them")
    echo(f"{name}: {data.stats['items']} items, {data.stats['users']} users ({data.skipped_users} skipped with "
         f"< 2 interactions, {data.dropped_same_day} same-day interactions dropped, {data.cut_histories} histories "
         f"cut to {MAX_HISTORY}); {len(train_users)} train + validation / {len(test_users)} test users; "
         f"sources available: {', '.join(avail) or 'none'}")
    report: dict[str, Any] = {"domain": name, "preset": preset, "data": data.stats, "data_hash": data.digest,
                              "split": {"train_and_validation": len(train_users), "test": len(test_users)}}
    if dry_run:
        echo("dry run: input valid; nothing trained or written")
        return {**report, "dry_run": True}

    ctx = make_context(preset, artifacts, runs, data, train_users, test_users, backbone, seed, progress, avail,
                       overrides, tag)
    cfg = ctx.preset.xcross
    _, val = ctx.split(name, cfg)
    test = ctx.domain(name).dev
    # zero-shot: every available source on the validation users (choice) and the test users (table)
    val_scores, test_res = {}, {}
    for s, path in avail.items():
        val_scores[s] = score_checkpoint(ctx, path, val, name, ctx.preset.lora.bf16, f"{s}->{name} val")["metrics"]
    chosen = list(sources) if sources else sorted(
        avail, key=lambda s: (val_scores[s]["hit@1"], val_scores[s]["mrr@10"]), reverse=True)[:2]
    echo("zero-shot on validation users (Hit@1): " + ", ".join(f"{s} {val_scores[s]['hit@1']:.1f}" for s in avail)
         + f"; sources: {', '.join(chosen)}")
    # the baselines on the test users first, on the untouched fp32 backbone (training X-Cross casts its frozen
    # weights to bf16 in place under the preset's bf16)
    bb = ctx.backbone()
    source_t = ctx.source(name, bb.tokenizer, cfg.max_len)
    for s, path in avail.items():
        test_res[s] = score_checkpoint(ctx, path, test, name, ctx.preset.lora.bf16, f"{s}->{name} test")
    floor_res = embedding_floor(bb, source_t, test, ctx.progress)
    tmp = artifacts / "domains" / f".{name}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        run = "xcross-" + "+".join(chosen)  # resumes a killed run of the same data, preset and sources
        xc = train_xcross(ctx, name, sources=chosen, name=run, out=tmp / "xcross", resume=True)
        if not xc.get("finished"):
            raise RuntimeError(f"X-Cross training stopped at step {xc.get('step')}; run again to resume")
        search = sorted({p.parent for p in avail.values()})
        model, manifest = load_model(tmp / "xcross", bb, search=search)  # the checkpoint as the service reads it
        model.eval()
        xres = evaluate_users(model, source_t, test, cfg.bf16, ctx.progress, "X-Cross test")
        results = {f"xcross ({'+'.join(chosen)})": xres}
        for s in avail:
            results[f"{s} LoRA zero-shot"] = test_res[s]
        if with_lora:
            lo = train_lora(ctx, name, out=tmp / "lora", resume=True)
            if not lo.get("finished"):
                raise RuntimeError("the domain's own LoRA stopped early; run again to resume")
            results[f"{name} LoRA (own)"] = score_checkpoint(ctx, tmp / "lora", test, name, ctx.preset.lora.bf16,
                                                             "own LoRA test")
        results["embedding floor"] = floor_res
        rows = [_metrics_row(k, r, xres) for k, r in results.items()]
        table = format_table(rows)
        echo(table)
        write_catalog(tmp / "catalog.jsonl", data.catalog, ctx.domain(name).popularity)
        report.update({"sources": chosen, "zero_shot_val": val_scores, "table": rows,
                       "xcross_hash": manifest["content_hash"], "wall_s": round(time.perf_counter() - t0, 1),
                       "train_wall_s": round(xc.get("wall_s", 0.0), 1),
                       "per_user": {k: r.get("per_user") for k, r in results.items()}})
        (tmp / "onboard.json").write_text(json.dumps(report, indent=1) + "\n")
        read_manifest(tmp / "xcross")
        install_atomic(tmp, artifacts / "domains" / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"wrote {artifacts / 'domains' / name} in {report['wall_s']:.0f} s; a running service picks it up with "
         "POST /admin/reload (or SIGHUP)")
    return report


# ----------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    @app.command("onboard")
    def onboard_cmd(
        domain: Annotated[str, typer.Option(help="the new domain's name (letters, digits, _ or -)")],
        items: Annotated[Path, typer.Option(help="items: JSON Lines {asin, title} or CSV asin,title")],
        interactions: Annotated[Path, typer.Option(
            help="JSON Lines {user, items: list of item keys} in time order, or CSV user,item,timestamp")],
        preset: Annotated[str, typer.Option(help="smoke | cpu | cpu-wave1 | paper")] = "cpu",
        artifacts: Annotated[Path | None, typer.Option(help="artifact root (default: artifacts/)")] = None,
        runs: Annotated[Path | None, typer.Option(help="resumable training state root (default: runs/)")] = None,
        sources: Annotated[str | None, typer.Option(help="comma-separated source LoRAs instead of the zero-shot "
                                                           "choice, e.g. Sports,Electronics")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="only validate the input")] = False,
        replace: Annotated[bool, typer.Option("--replace", help="replace an onboarded domain of that name")] = False,
        with_lora: Annotated[bool, typer.Option("--with-lora", help="also train the domain's own LoRA (a baseline "
                                                                    "and a future source)")] = False,
        backbone: Annotated[str, typer.Option(help="backbone name (minilm; tiny:bert for smoke tests)")] = "minilm",
        seed: Annotated[int, typer.Option(help="seed of the split and the negatives")] = 0,
        exclude_sources: Annotated[str | None, typer.Option(
            help="comma-separated source LoRAs to leave out of the choice (e.g. the domain a re-export came "
                 "from)")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    ) -> None:
        """Onboard a new domain from its own files: validate, choose sources zero-shot, train X-Cross, evaluate,
        and write artifacts/domains/NAME/ (catalog + checkpoint) atomically.

        Example:

            python -m training onboard --domain Garden --items garden_items.csv \\
                --interactions garden_events.csv --preset cpu

        then `curl -X POST -H "Authorization: Bearer $XCROSS_ADMIN_TOKEN" localhost:8000/admin/reload`.
        """
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        try:
            onboard(domain, items, interactions, preset=preset, artifacts=artifacts, runs=runs,
                    sources=[s.strip() for s in sources.split(",") if s.strip()] if sources else None,
                    dry_run=dry_run, replace=replace, with_lora=with_lora, backbone=backbone, seed=seed,
                    exclude_sources=[s.strip() for s in (exclude_sources or "").split(",") if s.strip()],
                    progress=not quiet, echo=typer.echo)
        except OnboardError as exc:
            typer.echo(f"onboard: {exc}", err=True)
            raise typer.Exit(2) from None
