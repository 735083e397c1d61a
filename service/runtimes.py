"""ONNX Runtime behind the engine's `Runtime` protocol (`XCROSS_BACKEND=onnx` or `onnx-int8`).

At start-up each served model is exported once to `<XCROSS_ONNX_CACHE>/<Domain>-<key>/model.onnx` (and
`model.int8.onnx` for int8), where `key` hashes what decides the graph: the checkpoint's content hash, its source
LoRAs' content hashes, the backbone, the opset and the torch / onnxruntime versions. A restart with the same
checkpoints reuses the files; a new checkpoint gets a new directory. Files land under a temporary name and are
renamed, so a crash never leaves a half-written model behind. Export parity (fp32) is checked before serving.

The exported form is the grouped one (streams folded into the batch, `load_models(streamwise=False)`): ONNX
Runtime ran it faster than the CPU's streamwise packed form (whose gathers and scatters it runs slowly), in fp32
and in int8. On CUDA the fp32 graph runs on onnxruntime-gpu's CUDA provider; int8 (dynamic quantization) is CPU
only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from model import onnx_export
from service.engine import ServedModel

log = logging.getLogger("service")

PARITY_TOL = 1e-4  # max |score difference| of the fp32 export vs torch


class OnnxRuntime:
    """One ONNX Runtime session per domain: (B, T) ids and mask -> (B,) fp32 scores on the CPU."""

    def __init__(self, sessions: Mapping[str, object], backend: str, device: str = "cpu"):
        self.sessions, self.backend, self.device = dict(sessions), backend, device

    def __call__(self, domain: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(onnx_export.run(self.sessions[domain], input_ids, attention_mask))

    def describe(self) -> dict[str, str]:
        providers = sorted({p for s in self.sessions.values() for p in s.get_providers()})
        return {"runtime": "onnxruntime", "backend": self.backend, "device": self.device,
                "precision": "int8" if self.backend == "onnx-int8" else "fp32", "providers": ",".join(providers)}


def cache_key(served: ServedModel, manifest_sources: list[str], backbone: str) -> str:
    import onnxruntime

    spec = {"sha": served.sha, "sources": manifest_sources, "backbone": backbone, "opset": onnx_export.OPSET,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "format": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def export_cached(served: ServedModel, cache: Path, key: str, int8: bool,
                  check: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """The model's ONNX file (int8 or fp32) under `cache`, exported (and parity-checked) when missing."""
    d = cache / f"{served.domain}-{key}"
    fp32 = d / "model.onnx"
    if not fp32.is_file():
        log.info("exporting %s to %s", served.name, fp32)
        onnx_export.export_onnx(served.model.cpu(), fp32)
        batches = [check] if check is not None else [onnx_export.example_batch(1000, 3, 24)]
        diff = onnx_export.parity(served.model, fp32, batches)
        if diff > PARITY_TOL:
            fp32.unlink()
            raise RuntimeError(f"{served.name}: ONNX export differs from torch by {diff:.2e} (> {PARITY_TOL}); "
                               "serve it with XCROSS_BACKEND=torch")
    if not int8:
        return fp32
    q = d / "model.int8.onnx"
    if not q.is_file():
        onnx_export.quantize_int8(fp32, q)
    return q


def build_onnx_runtime(models: Mapping[str, ServedModel], sources: Mapping[str, list[str]], backbone: str,
                       cache: Path, backend: str, device: str, threads: int) -> OnnxRuntime:
    """Export (or reuse) every served model and open its session. `sources`: source LoRA hashes per domain."""
    if backend not in ("onnx", "onnx-int8"):
        raise ValueError(f"backend {backend!r}: expected onnx or onnx-int8")
    int8 = backend == "onnx-int8"
    if int8 and device != "cpu":
        raise ValueError("XCROSS_BACKEND=onnx-int8 runs on the CPU only; use onnx (fp32) on CUDA")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sessions = {}
    for domain, served in models.items():
        path = export_cached(served, Path(cache), cache_key(served, sources.get(domain, []), backbone), int8)
        sessions[domain] = onnx_export.session(path, threads, providers)
        if device == "cuda" and "CUDAExecutionProvider" not in sessions[domain].get_providers():
            raise RuntimeError("XCROSS_BACKEND=onnx on CUDA needs onnxruntime-gpu (the `gpu` extra)")
    return OnnxRuntime(sessions, backend, device)
