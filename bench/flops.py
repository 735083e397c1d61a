"""FLOPs of one forward, counted from the modules (2 per multiply-add; padded tokens count, as they are computed),
and this machine's matmul peak measured with a large `torch.mm` in the same run."""

from __future__ import annotations

import torch
from torch import nn

from bench.timing import interleave, median
from model.inference import FusedLoRALinear, StreamwiseXCross
from model.lora import GroupedLoRALinear


def _layer_flops(layer: nn.Module, rows: int, T: int, d: int, att_rows: int | None = None,
                 attention: bool = True) -> float:
    """One encoder layer: linear layers over `rows` token rows, attention over `att_rows` (default: the same)
    query rows of sequences of length T."""
    total = 4.0 * (rows if att_rows is None else att_rows) * T * d * attention  # attention: Q K^T and A V
    for mod in layer.modules():
        if isinstance(mod, nn.Linear):
            total += 2.0 * rows * mod.in_features * mod.out_features
        elif isinstance(mod, (GroupedLoRALinear, FusedLoRALinear)):
            n, i, r = mod.A.shape
            total += 2.0 * rows * r * (i + mod.B.shape[-1])  # x A, then (x A) B, each stream on its rows
    return total


def xcross_flops(model: nn.Module, attention_mask: torch.Tensor, attention: bool = True) -> float:
    """FLOPs of `model(ids, mask)` for a (B, T) batch: layers (streams from `fold_at` on), integrators, head.
    `model` is an `XCross` (streams folded into the batch) or a `StreamwiseXCross` (streams in turn; when packed,
    the linear layers and integrators see only the real tokens)."""
    n, d = model.config.n_streams, model.head.pooler.in_features
    B, T = attention_mask.shape
    rows = B * T
    total = 0.0
    if isinstance(model, StreamwiseXCross):
        fold_at = model.fold_at
        if len(model.packed):
            rows = int(attention_mask.sum())
            per_layer = [tuple(p[l] for p in model.packed) for l in range(model.num_layers)]
        else:
            per_layer = list(zip(*model.streams, strict=True))  # (layer l of stream 0, of stream 1, ...)
    else:
        fold_at, per_layer = model.encoder.fold_at, [(layer,) for layer in model.encoder.layers]
    for l, layers in enumerate(per_layer):
        if l < fold_at:
            total += _layer_flops(layers[0], rows, T, d, B * T, attention)
        elif len(layers) == 1:
            total += _layer_flops(layers[0], rows * n, T, d, B * T * n, attention)  # folded: n*B rows
        else:
            total += sum(_layer_flops(layer, rows, T, d, B * T, attention) for layer in layers)
        if str(l) in model.integrators:
            total += 2.0 * rows * n * d * 2 * n * (n - 1) + 2.0 * rows * n * n * d  # eq. 4, eq. 5
    return total + 2.0 * B * (d * d + d)  # head


def plain_flops(layers: nn.ModuleList, B: int, T: int, d: int) -> float:
    """The backbone alone (no LoRA, no head)."""
    return sum(_layer_flops(layer, B * T, T, d) for layer in layers)


def matmul_peaks(size: int = 3072, reps: int = 5, bf16: bool = True) -> dict[str, float | None]:
    """GFLOP/s of a (size x size) @ (size x size) torch.mm in fp32 and bf16, interleaved, median of `reps`
    (`bf16=False`: fp32 only, bf16 None)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    fns = {"fp32": lambda _: torch.mm(a, b), **({"bf16": lambda _: torch.mm(a16, b16)} if bf16 else {})}
    times = interleave(fns, reps=reps)
    flops = 2.0 * size**3
    return {"bf16": None, **{k: flops / median(v) / 1e9 for k, v in times.items()}}
