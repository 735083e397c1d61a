"""Trainable-parameter accounting: a source LoRA vs an X-Cross model (paper: X-Cross trains ~25% of LoRA's)."""

from __future__ import annotations


def head_params(d: int) -> int:
    """Pooler (d x d + d) and scorer (d + 1), eqs. 7-8."""
    return d * d + d + d + 1


def lora_params(d: int, num_layers: int, r: int = 16, modules_per_layer: int = 4) -> int:
    """A (r x d) and B (d x r) on each adapted d x d projection (query, key, value, attention output)."""
    return num_layers * modules_per_layer * r * (d + d)


def xcross_params(d: int, n: int, top_k: int) -> int:
    """W_concat (2n(n-1) x n d) per integrated layer, plus w (n)."""
    return top_k * 2 * n * (n - 1) * n * d + n


def report(d: int, num_layers: int, n: int = 2, top_k: int | None = None, r: int = 16) -> dict[str, float]:
    k = num_layers if top_k is None else top_k
    lora, xcross, head = lora_params(d, num_layers, r), xcross_params(d, n, k), head_params(d)
    return {
        "lora": lora, "xcross": xcross, "head": head,
        "xcross_over_lora": xcross / lora,
        "xcross_over_lora_with_heads": (xcross + head) / (lora + head),
        "paper_footnote_ratio": (2 * n * (n - 1) * n * d) / (2 * r * d),  # per layer vs one A,B pair, as in fn. 3
    }
