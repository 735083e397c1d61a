"""Measured onboarding (issue 19): one of the amazon-xcross domains re-exported under another name and other keys
as a "new" domain (CSV, one interaction per day), its own LoRA left out of the sources, onboarded end to end on the
CPU; wall time and the test table go to results/onboard-<NAME>-<USERS>.json.

    OMP_NUM_THREADS=1 python -m bench.onboard --source Tools --name Hardware --users 200 --preset cpu
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from training.data import default_data_root

REPO = Path(__file__).resolve().parents[1]


def export(source: str, users: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """items.csv (asin = a new key per item) and events.csv (user,item,timestamp; one item per day)."""
    d = default_data_root() / source
    out.mkdir(parents=True, exist_ok=True)
    items = [json.loads(line) for line in open(d / "items.jsonl", encoding="utf-8")]
    key = {it["id"]: "K" + hashlib.sha1(f"{source}:{it['asin']}".encode()).hexdigest()[:10] for it in items}
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["asin", "title"])
        w.writerows([key[it["id"]], it["title"] if it["title"] is not None else "unknown item"] for it in items)
    rows = [json.loads(line) for line in open(d / "train.jsonl", encoding="utf-8")]
    pick = np.random.default_rng([seed, users]).choice(len(rows), min(users, len(rows)), replace=False)
    with open(out / "events.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp"])
        for i in sorted(pick):
            u = rows[i]
            for day, item in enumerate(u["items"]):
                w.writerow([f"u{hashlib.sha1(u['user'].encode()).hexdigest()[:8]}", key[item],
                            1_600_000_000 + day * 86_400])
    return out / "items.csv", out / "events.csv"


def main() -> None:
    from training.onboard import onboard

    p = argparse.ArgumentParser()
    p.add_argument("--source", default="Tools")
    p.add_argument("--name", default="Hardware")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--artifacts", type=Path, default=REPO / "runs" / "onboard-bench" / "artifacts")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    lora = a.artifacts / "lora"
    for d in sorted((REPO / "artifacts" / "lora").iterdir()):  # the shipped sources, minus the re-exported domain
        if d.name != a.source and not (lora / d.name).exists():
            shutil.copytree(d, lora / d.name)
    name = f"{a.name}{a.users}"
    ip, ep = export(a.source, a.users, REPO / "runs" / "onboard-bench" / name)
    t0 = time.perf_counter()
    rep = onboard(name, ip, ep, preset=a.preset, artifacts=a.artifacts, runs=REPO / "runs" / "onboard-bench",
                  replace=True, progress=not a.quiet, exclude_sources=[a.source])
    rep.pop("per_user", None)
    out = {"source_domain": a.source, "users_exported": a.users,
           "wall_s_end_to_end": round(time.perf_counter() - t0, 1), **rep}
    path = REPO / "results" / f"onboard-{a.source}-as-{a.name}-{a.users}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
