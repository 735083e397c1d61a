"""The GPU suite (run by bench/gpu.sh on a lent GPU, < 5 min): DeBERTa-v3-base shapes with random weights (the GPU
machines have no hub access), bf16, 30 prompts x 192 tokens per request, CUDA-event timing, interleaved rounds.

    bash bench/gpu.sh                          # on a CUDA machine; prints a table and a JSON line
    python -m bench.gpu --device cpu --tiny    # a smoke run of the same code on a 2-layer model (no GPU)

Reference (DESIGN 9, H200, bf16): the plain backbone takes 15.4 ms for 30 prompts and 18.4 ms for 60 prompts
x 192 tokens. Targets: the full X-Cross forward (n=2, K=9) within 1.15x of plain-60 (`xcross_over_plain60`),
the grouped path >= 1.5x faster than naive peft adapter-at-a-time (`grouped_vs_naive`). Also measured: fp32
vs bf16, CUDA graphs (static shapes), flashdeberta's Triton attention when installed (swapped into the same layers:
`flash_speedup`, with its max |diff| on full and half-padded prompts), ONNX Runtime's CUDA provider when installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch
from transformers import DebertaV2Config

from bench.timing import median
from model.backbone import backbone_from_config
from model.inference import optimize_for_inference
from model.reference import NaiveXCross, random_lora
from model.xcross import XCross, XCrossConfig


def deberta_v3_base(tiny: bool) -> DebertaV2Config:
    layers, hidden, heads = (2, 64, 4) if tiny else (12, 768, 12)
    return DebertaV2Config(vocab_size=128100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=512, relative_attention=True,
                           position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                           norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=0)


def timer(device: torch.device):
    """Seconds of fn(), measured with CUDA events on a GPU."""
    def run(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def interleaved(fns: dict, reps: int, device: torch.device) -> dict[str, float]:
    t = timer(device)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps + 2):  # two warm-up rounds (kernels, autotuning)
        for k, f in fns.items():
            s = t(f)
            if r >= 2:
                out[k].append(s)
    return {k: median(v) for k, v in out.items()}


def cuda_graph(model, ids, mask, bf16: bool):
    """A replayable CUDA graph of model(ids, mask) at this static shape."""
    static_ids, static_mask = ids.clone(), mask.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    ctx = lambda: torch.autocast("cuda", torch.bfloat16, enabled=bf16)  # noqa: E731
    with torch.cuda.stream(stream), torch.inference_mode(), ctx():
        for _ in range(3):
            model(static_ids, static_mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), ctx():
        out = model(static_ids, static_mask)
    return graph, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer model (smoke test of the script)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--tokens", type=int, default=192)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    cfg = deberta_v3_base(args.tiny)
    bb = backbone_from_config(cfg, None, seed=0)  # no tokenizer: the ids are random
    naive_bb = backbone_from_config(cfg, None, seed=0)  # peft wraps its modules in place
    L = cfg.num_hidden_layers
    loras = [random_lora(bb, s, std=0.02) for s in range(2)]
    top_k = min(9, L)
    ref = XCross(bb, loras, XCrossConfig(top_k=top_k, init_std=0.02)).eval()
    naive = NaiveXCross(naive_bb, loras, ref)
    grouped = optimize_for_inference(XCross(bb, loras, XCrossConfig(top_k=top_k, init_std=0.02)).eval())
    grouped.load_state_dict(ref.state_dict(), strict=False)
    single = optimize_for_inference(XCross(bb, loras[:1], XCrossConfig(n_streams=1, top_k=0)).eval())
    for m in (bb.model, naive_bb.model, ref, grouped, single):
        m.to(device)
    naive.peft.to(device)
    B, T = args.prompts, args.tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    ids60, mask60 = ids.repeat(2, 1), mask.repeat(2, 1)

    def call(m, *batch, bf16=True):
        def f():
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext():
                return m(*batch)
        return f

    plain = lambda i, m: bb.model(input_ids=i, attention_mask=m).last_hidden_state  # noqa: E731
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16):
        diff_grouped = (grouped(ids, mask) - ref(ids, mask)).abs().max().item()
        diff_naive = (naive(ids, mask) - ref(ids, mask)).abs().max().item()
    fns = {"plain30": call(plain, ids, mask), "plain60": call(plain, ids60, mask60),
           "xcross": call(grouped, ids, mask), "xcross_ref": call(ref, ids, mask), "naive": call(naive, ids, mask),
           "single": call(single, ids, mask), "xcross_fp32": call(grouped, ids, mask, bf16=False)}
    extra: dict = {}
    if device.type == "cuda":
        try:
            graph, _ = cuda_graph(grouped, ids, mask, bf16=True)
            fns["xcross_cudagraph"] = graph.replay
        except Exception as exc:  # noqa: BLE001 - report and go on
            extra["cuda_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        fbb, xflash = flash_models(cfg, loras, ref, top_k, device)
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16):
            extra["max_abs_diff_flash_vs_ref_bf16"] = (xflash(ids, mask) - ref(ids, mask)).abs().max().item()
            pad = mask.clone()
            pad[:, T // 2:] = 0  # padded prompts take flashdeberta's varlen kernel
            extra["max_abs_diff_flash_vs_ref_padded_bf16"] = (xflash(ids, pad) - ref(ids, pad)).abs().max().item()
        fns["xcross_flash"] = call(xflash, ids, mask)
        fns["plain30_flash"] = call(lambda i, m: fbb.model(input_ids=i, attention_mask=m).last_hidden_state, ids, mask)
        extra["flashdeberta"] = "measured (its attention swapped into the same layers)"
    except ImportError:
        extra["flashdeberta"] = "not installed (pip install flashdeberta; carry its wheel to the GPU machine)"
    except Exception as exc:  # noqa: BLE001 - report and go on (triton kernels need a GPU)
        fns.pop("xcross_flash", None)
        extra["flashdeberta"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    times = interleaved(fns, args.reps, device)
    keys = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shape": f"{B}x{T}, {'tiny' if args.tiny else 'deberta-v3-base'} (random weights), n=2, K={top_k}",
            "xcross_over_plain60": times["xcross"] / times["plain60"],
            "plain60_over_plain30": times["plain60"] / times["plain30"],
            "grouped_vs_naive": times["naive"] / times["xcross"],
            "optimized_vs_ref": times["xcross_ref"] / times["xcross"],
            "xcross_over_single": times["xcross"] / times["single"],
            "bf16_speedup": times["xcross_fp32"] / times["xcross"],
            "max_abs_diff_grouped_vs_ref_bf16": diff_grouped, "max_abs_diff_naive_vs_ref_bf16": diff_naive,
            **{f"{k}_ms": 1000 * v for k, v in times.items()}, **extra}
    if "xcross_flash" in times:
        keys["flash_speedup"] = times["xcross"] / times["xcross_flash"]
        keys["plain_flash_speedup"] = times["plain30"] / times["plain30_flash"]
    if "xcross_cudagraph" in times:
        keys["cuda_graph_speedup"] = times["xcross"] / times["xcross_cudagraph"]
    keys["onnx_cuda"] = onnx_cuda(grouped, ids, mask, times["xcross_fp32"], device) if device.type == "cuda" else (
        "skipped (CPU)")
    keys["seconds"] = time.perf_counter() - t0
    for k, v in keys.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    print(json.dumps(keys, default=str))
    return 0


def flash_models(cfg: DebertaV2Config, loras: list, ref: XCross, top_k: int, device: torch.device):
    """The plain backbone and X-Cross (ref's weights) on a second copy of the weights, with flashdeberta's fused
    disentangled attention (Triton) in place of transformers' `DisentangledSelfAttention`: same parameters, so the
    class is swapped on the existing modules. Raises ImportError when flashdeberta is not installed."""
    from flashdeberta.model import FlashDisentangledSelfAttention
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

    fbb = backbone_from_config(cfg, None, seed=0)
    xflash = optimize_for_inference(XCross(fbb, loras, XCrossConfig(top_k=top_k, init_std=0.02)).eval())
    xflash.load_state_dict(ref.state_dict(), strict=False)
    for m in (*fbb.model.modules(), *xflash.modules()):
        if type(m) is DisentangledSelfAttention:
            m.__class__ = FlashDisentangledSelfAttention
    fbb.model.to(device)
    return fbb, xflash.to(device)


def onnx_cuda(model, ids, mask, torch_fp32_s: float, device: torch.device) -> dict | str:
    """The fp32 ONNX export on onnxruntime-gpu's CUDA provider vs torch fp32 (when onnxruntime-gpu is present)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime-gpu not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no CUDAExecutionProvider (install the `gpu` extra: onnxruntime-gpu)"
    import tempfile

    from model.onnx_export import export_onnx, run, session

    path = export_onnx(model.float().cpu(), tempfile.mkdtemp() + "/x.onnx")
    model.to(device)
    sess = session(path, providers=["CUDAExecutionProvider"])
    run(sess, ids, mask)
    t0 = time.perf_counter()
    for _ in range(5):
        run(sess, ids, mask)
    return {"ort_cuda_fp32_ms": 1000 * (time.perf_counter() - t0) / 5,
            "ort_over_torch_fp32": (time.perf_counter() - t0) / 5 / torch_fp32_s}


if __name__ == "__main__":
    sys.exit(main())
