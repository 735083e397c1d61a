"""Export a whole `XCross` forward to ONNX (any n_streams, the single-stream LoRA model included), check it, and
quantize it to int8 (ONNX Runtime dynamic quantization).

    from model.onnx_export import export_onnx, parity, quantize_int8
    export_onnx(model, "model.onnx")                # inputs input_ids, attention_mask (int64, (B, T)); output scores
    parity(model, "model.onnx", [(ids, mask)])      # max |score difference| vs torch, fp32
    quantize_int8("model.onnx", "model.int8.onnx")  # weights int8, activations quantized per batch at run time

Any scoring module exports (`XCross` or its inference forms, model/inference.py). The graph holds everything:
embeddings, every stream's layers with their LoRAs, the integrators, eq. 6 and the head. Batch and sequence
axes are dynamic. It is traced with the TorchScript exporter
(`dynamo=False`: needs no onnxscript, and handles both BERT and DeBERTa-v2 here); tracing records one path, so the
model must not branch on values (it does not: the fold layer and the integrated layers are fixed per model).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

OPSET = 17
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "scores"


def example_batch(vocab_size: int, batch: int = 2, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with padding in the last row (so the traced graph masks padding)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(vocab_size, 1000), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    return ids, mask


def export_onnx(model: torch.nn.Module, path: str | Path, *, opset: int = OPSET,
                example: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write the model's forward as ONNX with dynamic (batch, seq) axes; fp32 on the CPU."""
    if opset < OPSET:
        raise ValueError(f"opset {opset} is too old; use {OPSET} or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), 1000)
    ids, mask = example if example is not None else example_batch(vocab)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, OUTPUT: {0: "batch"}}
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shapes as Python ints: the axes are still dynamic
        torch.onnx.export(model, (ids, mask), str(tmp), input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    tmp.replace(path)  # a half-written file never has the final name
    return path


def session(path: str | Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session with all graph optimizations; `threads` intra-op threads (0 = ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def run(sess, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """Scores (B,) fp32 from a session."""
    feed = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
            "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}
    return sess.run([OUTPUT], feed)[0]


def parity(model: torch.nn.Module, path: str | Path, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
           threads: int = 0) -> float:
    """Max |ONNX Runtime score - torch score| over the batches (fp32, CPU)."""
    sess = session(path, threads)
    worst = 0.0
    with torch.inference_mode():
        for ids, mask in batches:
            want = model(ids, mask).float().numpy()
            worst = max(worst, float(np.abs(run(sess, ids, mask) - want).max()))
    return worst


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization: int8 weights of every MatMul/Gemm, activations quantized per call (CPU)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    tmp.replace(dst)
    return dst
