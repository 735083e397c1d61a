"""Explorations of a full run (issue 7, part 3): what else was tried, each timed side by side.

  batch_sizes   latency of one forward vs prompts per forward (the latency plot)
  packing       the served CPU form with and without skipping padding (BERT: PackedBertLayer)
  sort          a 300-candidate request in forwards of 30, in request order vs sorted by prompt length
  threads       1 vs 2 intra-op threads
  malloc        glibc's default mmap behaviour vs service.machine.tune_malloc, at 30 and 60 prompts (subprocesses)
  compile       torch.compile (inductor) of the grouped forward vs eager
  profile       the served bf16 X-Cross under torch.profiler: each top op's share of the time
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.forward import Setup
from bench.models import Request, load
from bench.timing import interleave, median, ratio
from model.inference import serving_autocast
from model.onnx_export import run, session


def rows_of(requests: list[Request]) -> list[torch.Tensor]:
    """Every prompt of the requests as its unpadded ids."""
    return [ids[m.bool()] for r in requests for ids, m in zip(r.input_ids, r.attention_mask, strict=True)]


def collate(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _call(model: Callable, bf16: bool) -> Callable[[tuple[torch.Tensor, torch.Tensor]], Any]:
    """batch -> scores; `bf16`: under autocast unless the model runs bf16 end to end (`serve_bf16_`)."""

    def call(batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        with torch.inference_mode(), serving_autocast(model, "cpu", bf16):
            return model(*batch)

    return call


def batch_sizes(s: Setup, models: dict[str, Any], reps: int, sizes=(1, 8, 16, 30, 60, 120)) -> list[dict]:
    rows = rows_of(s.requests)
    ort8 = session(s.work / "xcross.int8.onnx", s.threads)
    fns = {"X-Cross fp32": _call(models["xcross"], False), "X-Cross bf16": _call(models["xcross_bf16"], True),
           "LoRA bf16": _call(models["single_bf16"], True), "X-Cross ORT int8": lambda b: run(ort8, *b)}
    out = []
    for size in sizes:
        batches = [collate([rows[(i * size + k) % len(rows)] for k in range(size)]) for i in range(reps)]
        times = interleave({k: (lambda i, f=f, bs=batches: f(bs[i])) for k, f in fns.items()}, reps=reps)
        out.append({"prompts": size, **{k: median(v) for k, v in times.items()}})
    return out


def packing(s: Setup, models: dict[str, Any], reps: int) -> dict[str, float]:
    unpacked = load(s.artifacts, s.fp32, packed=False)
    unpacked16 = load(s.artifacts, s.bf16, packed=False, bf16_weights=True)
    req = s.requests
    fns = {"packed": _call(models["xcross"], False), "unpacked": _call(unpacked, False),
           "packed_bf16": _call(models["xcross_bf16"], True), "unpacked_bf16": _call(unpacked16, True)}
    times = interleave({k: (lambda i, f=f: f((req[i % len(req)].input_ids, req[i % len(req)].attention_mask)))
                        for k, f in fns.items()}, reps=reps)
    pad = float(np.mean([1 - r.attention_mask.float().mean().item() for r in req]))
    return {"padding_fraction": pad, "speedup_fp32": ratio(times, "unpacked", "packed"),
            "speedup_bf16": ratio(times, "unpacked_bf16", "packed_bf16")}


def sort_buckets(s: Setup, models: dict[str, Any], reps: int, candidates: int = 300) -> dict[str, float]:
    """One request of `candidates` prompts (a dev user's history, catalog items as candidates)."""
    rows = rows_of(s.requests)[:candidates]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    plain = [collate(rows[i : i + 30]) for i in range(0, len(rows), 30)]
    bucketed = [collate([rows[j] for j in order[i : i + 30]]) for i in range(0, len(rows), 30)]
    grouped16 = load(s.artifacts, s.bf16, form="grouped", bf16_weights=True)
    fns = {"served_plain": (models["xcross_bf16"], plain), "served_sorted": (models["xcross_bf16"], bucketed),
           "grouped_plain": (grouped16, plain), "grouped_sorted": (grouped16, bucketed)}
    times = interleave({k: (lambda i, m=m, bs=bs: [_call(m, True)(b) for b in bs]) for k, (m, bs) in fns.items()},
                       reps=max(3, reps // 2))
    tokens = lambda bs: sum(b[0].numel() for b in bs)  # noqa: E731
    return {"prompts": len(rows), "padded_tokens_ratio": tokens(plain) / tokens(bucketed),
            "speedup_served": ratio(times, "served_plain", "served_sorted"),
            "speedup_grouped": ratio(times, "grouped_plain", "grouped_sorted")}


def threads(s: Setup, models: dict[str, Any], reps: int) -> dict[str, float]:
    cores = os.cpu_count() or 1
    if cores < 2:
        return {"skipped": "one core"}
    req, before = s.requests, torch.get_num_threads()

    def at(n: int, f: Callable) -> Callable[[int], Any]:
        def call(i: int) -> Any:
            torch.set_num_threads(n)
            try:
                return f((req[i % len(req)].input_ids, req[i % len(req)].attention_mask))
            finally:
                torch.set_num_threads(before)

        return call

    fp32, bf16 = _call(models["xcross"], False), _call(models["xcross_bf16"], True)
    times = interleave({"fp32_1": at(1, fp32), "fp32_2": at(2, fp32), "bf16_1": at(1, bf16), "bf16_2": at(2, bf16)},
                       reps=reps)
    return {"fp32_2_over_1": ratio(times, "fp32_1", "fp32_2"), "bf16_2_over_1": ratio(times, "bf16_1", "bf16_2")}


def malloc(s: Setup, models: dict[str, Any], reps: int, runs: int = 2) -> dict[str, float]:
    """Plain MiniLM at 30 and 60 prompts in fresh processes, glibc's default malloc vs `tune_malloc`, alternated."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads)}
    got: dict[str, list[float]] = {}
    for _ in range(runs):
        for tuned in (False, True):
            cmd = [sys.executable, "-m", "bench.malloc_probe", "--reps", "3"] + (["--tuned"] if tuned else [])
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env,
                                            cwd=Path(__file__).resolve().parents[1]).stdout.strip().splitlines()[-1])
            for k, v in out.items():
                got.setdefault(f"{'tuned' if tuned else 'default'}_{k}", []).append(v)
    m = {k: median(v) for k, v in got.items()}
    return {"speedup_30": m["default_30"] / m["tuned_30"], "speedup_60": m["default_60"] / m["tuned_60"],
            "cost_60_over_30_default": m["default_60"] / m["default_30"],
            "cost_60_over_30_tuned": m["tuned_60"] / m["tuned_30"]}


def compiled(s: Setup, models: dict[str, Any], reps: int) -> dict[str, Any]:
    grouped = load(s.artifacts, s.fp32, form="grouped")
    req = s.requests
    try:
        t0 = time.perf_counter()
        comp = torch.compile(grouped, dynamic=True)
        _call(comp, False)((req[0].input_ids, req[0].attention_mask))
        compile_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - an exploration: record why it failed
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "trace": traceback.format_exc(-1)}
    fns = {"eager": _call(grouped, False), "compiled": _call(comp, False)}
    times = interleave({k: (lambda i, f=f: f((req[i % len(req)].input_ids, req[i % len(req)].attention_mask)))
                        for k, f in fns.items()}, reps=reps)
    return {"compile_s": compile_s, "speedup": ratio(times, "eager", "compiled")}


def profile(s: Setup, models: dict[str, Any], reps: int, requests: int = 3, top: int = 7) -> dict[str, float]:
    """Where the served bf16 X-Cross spends its time: torch.profiler over a few requests, each top op's share of
    the self CPU time (`addmm` = the linear layers, `_scaled_dot_product_flash_attention_for_cpu` = attention)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    call = _call(models["xcross_bf16"], True)
    batches = [(r.input_ids, r.attention_mask) for r in s.requests[:requests]]
    call(batches[0])  # warm
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            call(b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {e.key.removeprefix("aten::"): e.self_cpu_time_total / total for e in ranked}


def run_all(s: Setup, details: dict[str, Any], reps: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    models = details["info"]["models"]
    out: dict[str, Any] = {}
    for name, fn in (("batch_sizes", batch_sizes), ("packing", packing), ("sort", sort_buckets),
                     ("threads", threads), ("malloc", malloc), ("compile", compiled), ("profile", profile)):
        log(f"explore: {name}")
        t0 = time.perf_counter()
        try:
            out[name] = fn(s, models, reps)
        except Exception as exc:  # noqa: BLE001 - one exploration failing does not lose the others
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if isinstance(out[name], dict):
            out[name]["seconds"] = time.perf_counter() - t0
    return out
