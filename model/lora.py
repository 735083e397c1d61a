"""LoRA adapters as plain tensors, and the grouped multi-adapter linear (DESIGN 5.1, 5.3).

A trained adapter is a `LoraWeights`: for every adapted module path, `A` (r, in) and `B` (out, r) as peft stores
them (`lora_A.weight`, `lora_B.weight`) and the scale alpha/r, so that `delta_W = scale * B @ A` (eq. 3 writes
the same product as A_m B_m with the transposed convention).

`GroupedLoRALinear` applies n adapters to n copies of the same batch folded into the batch dimension: the frozen
base linear runs once over all n*B rows; each stream's low-rank delta is one batched matmul.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LoraConfig:
    """The paper's LoRA: r=16, alpha=32 (dropout only matters in training)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    targets: str = ""  # regex over module paths; empty = the backbone family's default (model.backbone)

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"LoraConfig: r and alpha must be positive (got r={self.r}, alpha={self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1) (got {self.dropout})")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass
class LoraWeights:
    """One trained adapter: per module path A (r, in), B (out, r); delta_W = scale * B @ A."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scale: float
    meta: dict = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[0]

    def delta(self, module: str) -> torch.Tensor:
        """delta_W (out, in) of one module."""
        return self.scale * self.B[module] @ self.A[module]

    def layer_index(self, module: str) -> int:
        return int(re.search(r"\.layer\.(\d+)\.", f".{module}").group(1))

    def top_layers(self, k: int, num_layers: int) -> LoraWeights:
        """The same adapter on the top `k` of `num_layers` layers only (the lower layers' deltas dropped)."""
        keep = [m for m in self.A if self.layer_index(m) >= num_layers - k]
        return LoraWeights({m: self.A[m] for m in keep}, {m: self.B[m] for m in keep}, self.scale, dict(self.meta))

    @classmethod
    def from_peft(cls, peft_model: nn.Module, adapter: str = "default") -> LoraWeights:
        """Read an adapter out of a peft model; module paths relative to the encoder (e.g. encoder.layer.0...)."""
        A, B, scale = {}, {}, None
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                path = _strip_peft_prefix(name)
                A[path] = module.lora_A[adapter].weight.detach().clone()
                B[path] = module.lora_B[adapter].weight.detach().clone()
                scale = float(module.scaling[adapter])
        if not A:
            raise ValueError(f"no LoRA adapter named {adapter!r} in the model")
        return cls(A, B, scale)

    @classmethod
    def merge(cls, loras: list[LoraWeights], weights: Sequence[float] | torch.Tensor | None = None) -> LoraWeights:
        """sum_i lambda_i s_i B_i A_i, exactly (WeaveRec's merge; default lambda uniform): the ranks are
        concatenated, A = [A_1; ...; A_n], B = [lambda_1 s_1 B_1, ..., lambda_n s_n B_n], scale 1.

        Not peft's `add_weighted_adapter("linear")`, which mixes the A's and the B's separately (DESIGN 5.7)."""
        if not loras:
            raise ValueError("merge of LoRAs: no adapters given")
        if {tuple(x.modules) for x in loras} != {tuple(loras[0].modules)}:
            raise ValueError("merge of LoRAs: the adapters adapt different modules")
        n = len(loras)
        lam = torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if lam.shape != (n,):
            raise ValueError(f"merge of LoRAs: {lam.numel()} weights for {n} adapters")
        A = {m: torch.cat([x.A[m] for x in loras], 0) for m in loras[0].modules}
        B = {m: torch.cat([x.B[m] * (float(lam[i]) * x.scale) for i, x in enumerate(loras)], 1)
             for m in loras[0].modules}
        return cls(A, B, 1.0, {"merge_of": n, "weights": [round(float(v), 6) for v in lam]})

    @classmethod
    def mean(cls, loras: list[LoraWeights]) -> LoraWeights:
        """The average of the adapters' delta_W, exactly: concatenate ranks, (1/n) sum_i s_i B_i A_i."""
        out = cls.merge(loras)
        out.meta = {"mean_of": len(loras)}
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for m in self.modules:
            out[f"{m}.lora_A"] = self.A[m].contiguous()
            out[f"{m}.lora_B"] = self.B[m].contiguous()
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], scale: float) -> LoraWeights:
        A = {k[: -len(".lora_A")]: v for k, v in tensors.items() if k.endswith(".lora_A")}
        B = {k[: -len(".lora_B")]: v for k, v in tensors.items() if k.endswith(".lora_B")}
        if set(A) != set(B) or not A:
            raise ValueError("LoRA tensors: every module needs both lora_A and lora_B")
        return cls(A, B, scale)


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


class GroupedLoRALinear(nn.Module):
    """y = base(x) + (x_s A_s) B_s for the stream s each row block belongs to; x is (n*B, ..., in)."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.base = base  # shared, frozen
        self.register_buffer("A", A, persistent=False)  # (n, in, r), frozen
        self.register_buffer("B", B, persistent=False)  # (n, r, out), scale folded in, frozen

    @property
    def n_streams(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # one GEMM over all n*B rows
        xs = x.reshape(self.n_streams, -1, x.shape[-1])  # (n, B*T, in)
        delta = torch.bmm(torch.bmm(xs, self.A.to(xs.dtype)), self.B.to(xs.dtype))  # (n, B*T, out)
        return y + delta.reshape(y.shape).to(y.dtype)


def stack_adapters(loras: list[LoraWeights], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, in, r) and (n, r, out) for one module, with each adapter's scale folded into B."""
    A = torch.stack([x.A[module].t() for x in loras])
    B = torch.stack([(x.B[module] * x.scale).t() for x in loras])
    return A.contiguous(), B.contiguous()


def shared_copy(module: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the same tensors (no memory copied)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def inject_grouped(root: nn.Module, loras: list[LoraWeights], prefix: str = "") -> list[str]:
    """Replace every adapted nn.Linear under `root` by a GroupedLoRALinear over the n adapters, in place."""
    modules = loras[0].modules
    if any(x.modules != modules for x in loras):
        raise ValueError("all streams' LoRAs must adapt the same modules")
    done = []
    for path in modules:
        if not path.startswith(prefix):
            continue
        parent_path, _, leaf = path[len(prefix) :].rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = getattr(parent, leaf)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA module {path} is a {type(base).__name__}, expected nn.Linear")
        setattr(parent, leaf, GroupedLoRALinear(base, *stack_adapters(loras, path)))
        done.append(path)
    return done
