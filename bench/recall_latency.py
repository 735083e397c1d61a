"""Latency of the two-stage request (issue 20): POST /recommend without candidates (text recall of N items, then
the served model ranks them) against requests that bring their candidates, measured in the same run.

    OMP_NUM_THREADS=1 python -m bench.recall_latency --domain Tools --reps 10 [--threads 1] [--out results/...json]

The app runs in this process (FastAPI TestClient over `create_app`: routing, validation, batcher, one forward
thread) over the shipped checkpoints (`load_engine`, the service's own loading). Each round, in turn, on one dev
user's history: the two-stage request (no candidates), the same user's 30 dev candidates (the usual request), and
the N recalled items given as candidates (the same forwards without the recall step); plus the recall step alone.
Printed: p50 / p95 of each and the paired ratios (median over rounds of two_stage[r] / given[r], bench.timing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from bench.timing import interleave, ratio
from service.app import create_app
from service.catalog import Resolved
from service.loading import load_engine
from service.machine import cpu_model
from service.settings import load_settings
from service.text_recall import MODES, build_recall_stages, build_text_recall
from training.data import load_domain
from training.pipeline import git_commit


def percentiles(xs: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(1000 * float(np.percentile(xs, q)), 1) for q in (50, 95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domain", default="Tools")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--recall-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index", default="exact", choices=["exact", "hnsw"])
    ap.add_argument("--mode", default="auto", choices=MODES, help="XCROSS_RECALL_MODE (auto: what the service serves)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    settings = load_settings(redis_url=None, threads=args.threads, recall_n=0, warmup=False,  # recall: below
                             request_timeout_s=600)  # 200 candidates on one loaded thread can pass 30 s
    engine = load_engine(settings)
    text = build_text_recall(engine.backbone, engine.catalogs, [args.domain], args.index,
                             load_settings().recall_cache)  # cached fp32 embeddings (training/full_catalog)
    engine.recall = build_recall_stages(text, settings.artifacts / "recall", args.mode)
    engine.recall_n = args.recall_n
    users = load_domain(args.domain).dev[: args.reps + 1]
    catalog = engine.catalogs[args.domain]

    def hist(i: int) -> list[dict]:
        return [{"id": x} for x in users[i].history]

    recalled = [[c.id for c in engine.recall_candidates(args.domain,
                                                        [Resolved(catalog.titles[x], x) for x in u.history])[0]]
                for u in users]
    with TestClient(create_app(settings, engine=engine)) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)

        def post(body: dict) -> dict:
            r = client.post("/recommend", json=body)
            r.raise_for_status()
            return r.json()

        variants = {
            "two_stage": lambda i: post({"domain": args.domain, "history": hist(i), "top_k": 10}),
            "given_30": lambda i: post({"domain": args.domain, "history": hist(i), "top_k": 10,
                                        "candidates": [{"id": c} for c in users[i].candidates]}),
            f"given_{args.recall_n}": lambda i: post({"domain": args.domain, "history": hist(i), "top_k": 10,
                                                      "candidates": [{"id": c} for c in recalled[i]]}),
            "recall_only": lambda i: engine.recall_candidates(
                args.domain, [Resolved(catalog.titles[x], x) for x in users[i].history]),
            "text_recall_only": lambda i: text[args.domain].candidates(
                [Resolved(catalog.titles[x], x) for x in users[i].history], args.recall_n),
        }
        outputs: dict[str, list] = {}
        times = interleave(variants, reps=args.reps, outputs=outputs)
    assert all(o["recall"] for o in outputs["two_stage"]) and not any(o["recall"] for o in outputs["given_30"])
    given_n = f"given_{args.recall_n}"
    out = {
        "domain": args.domain, "recall_n": args.recall_n, "index": args.index, "reps": args.reps,
        "model": outputs["two_stage"][0]["model"], "recall": outputs["two_stage"][0]["recall"],
        "latency": {k: percentiles(v) for k, v in times.items()},
        "ratios": {"two_stage_over_given_30": round(ratio(times, "two_stage", "given_30"), 2),
                   f"two_stage_over_{given_n}": round(ratio(times, "two_stage", given_n), 3),
                   "recall_share_of_two_stage": round(ratio(times, "recall_only", "two_stage"), 4),
                   "recall_over_text_recall": round(ratio(times, "recall_only", "text_recall_only"), 2)},
        "backend": engine.runtime.describe(), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
        "commit": git_commit(), "command": "python -m bench.recall_latency " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
