"""The benchmark suite runs and reports every key (timings are not asserted: a benchmark is not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import xcross_flops
from bench.report import gpu_section
from bench.timing import interleave, ratio
from model.inference import optimize_for_inference
from model.xcross import XCross, XCrossConfig
from tests.model.test_xcross import batch, random_lora
from tests.tiny import tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ["fast_vs_naive", "xcross_over_single", "xcross_over_single_shared3", "single_vs_crossencoder",
        "bf16_speedup", "bf16_hit1_diff", "ort_fp32_speedup", "ort_fp32_max_abs_diff", "ort_int8_speedup",
        "ort_int8_hit1_diff", "service_over_raw", "service_p50_over_raw", "cache_speedup", "flop_efficiency",
        "bf16_flop_efficiency", "cpu", "cpu_flags", "threads", "contended", "train_step_over_forward",
        "train_prompts_per_s", "train_step_over_forward_peft", "train_fast_over_peft",
        "train_math_attention_speedup"]


def test_interleave_runs_variants_in_turn_and_keeps_outputs():
    calls, outs = [], {}
    times = interleave({"a": lambda i: calls.append(("a", i)) or i, "b": lambda i: calls.append(("b", i))},
                       reps=3, warmup=1, outputs=outs)
    assert calls == [("a", 0), ("b", 0), ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert len(times["a"]) == 3 and outs["a"] == [0, 1, 2] and ratio(times, "a", "a") == 1.0


@pytest.mark.parametrize("form", ["grouped", "streamwise", "packed"])
def test_flop_count_matches_torch_flop_counter(form):
    bb = tiny_backbone("bert")
    model = XCross(bb, [random_lora(bb, 0), random_lora(bb, 1)], XCrossConfig(top_k=1)).eval()
    model = optimize_for_inference(model, streamwise=form != "grouped", packed=form == "packed")
    ids, mask = batch(bb)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, mask)
    counted = counter.get_total_flops()  # matmuls (it has no formula for the CPU flash-attention kernel)
    assert abs(xcross_flops(model, mask, attention=False) - counted) / counted < 0.02


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_bench_prints_every_key_as_json():
    # --smoke: one timed round of every quick comparison; this checks every key and the correctness diffs, not
    # timings. One thread: the bench process and the server it starts do not then contend for the 2 cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", "--threads", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [k for k in KEYS if k not in keys], keys
    assert keys["ort_fp32_max_abs_diff"] < 1e-4 and keys["fast_vs_naive_max_abs_diff"] < 1e-4
    # a step needs at least a forward and a backward: below 1x a forward the two were not timed alike
    assert keys["train_step_over_forward"] > 1 and keys["train_step_over_forward_peft"] > 1


def test_gpu_section_renders_the_recorded_gpu_run_with_verdicts(tmp_path):
    assert "No GPU run recorded" in "\n".join(gpu_section(tmp_path))
    keys = {"shape": "30x192", "xcross_over_plain60": 1.1, "grouped_vs_naive": 1.2, "plain60_over_plain30": 1.9,
            "cuda_graph_error": "RuntimeError: boom.\nmore", "onnx_cuda": "not installed"}
    run = {"command": "bash bench/gpu.sh", "date": "d", "commit": "c", "machine": "m", "reps": 5, "keys": keys}
    (tmp_path / "bench-gpu-h100.json").write_text(json.dumps(run))
    text = "\n".join(gpu_section(tmp_path))
    assert "| `xcross_over_plain60` | 1.1 | <= 1.15 | met |" in text
    assert "| `grouped_vs_naive` | 1.2 | >= 1.5 | missed |" in text
    assert "capture failed (RuntimeError: boom)" in text and "60 prompts cost 1.9x of 30" in text


def test_shared3_accuracy_compares_the_truncated_run_with_full_xcross(tmp_path):
    from bench.report import shared3_accuracy

    assert shared3_accuracy(tmp_path)[1] is None
    ranks = [1, 2, 5, 1, 12, 3, 1, 7, 2, 4] * 5

    def result(name, rs):
        hit1 = 100 * sum(r == 1 for r in rs) / len(rs)
        per_user = [{"user": str(i), "rank": r} for i, r in enumerate(rs)]
        metrics = {"hit@1": hit1, "mrr@10": 20.0, "n_users": len(rs)}
        (tmp_path / f"{name}-Tools-cpu.json").write_text(json.dumps({"metrics": metrics, "per_user": per_user}))

    result("xcross", ranks)
    result("shared3", ranks[:-1] + [1])  # one user better: no significant change
    text, kept = shared3_accuracy(tmp_path)
    assert kept is True and "no significant loss" in text
    result("shared3", [r + 20 for r in ranks])  # every target pushed out of the top 10: a loss
    assert shared3_accuracy(tmp_path)[1] is False
