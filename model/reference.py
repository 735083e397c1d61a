"""Reference code for tests and benchmarks: random (non-zero) LoRAs, and X-Cross computed the slow, obvious way.

`NaiveXCross` is the reference of DESIGN 5.3: peft adapters toggled with `set_adapter`, one stream at a time, layer
by layer, eq. 5 as a Python loop. It shares nothing with the fast path but the frozen layers and the trained
integrator weights, w and head, so equal scores mean the fast path computes eqs. 3-8.
"""

from __future__ import annotations

import re

import torch

from model.backbone import Backbone
from model.lora import LoraWeights
from model.xcross import XCross


def random_lora(backbone: Backbone, seed: int, std: float = 0.05, layers: set[int] | None = None, r: int = 16,
                alpha: int = 32) -> LoraWeights:
    """Non-zero A and B on the family's target modules (of `layers` only, when given)."""
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name, mod in backbone.model.named_modules():
        if re.fullmatch(backbone.lora_targets, name):
            if layers is not None and int(re.search(r"\.layer\.(\d+)\.", f".{name}").group(1)) not in layers:
                continue
            A[name] = torch.randn(r, mod.in_features, generator=g) * std
            B[name] = torch.randn(mod.out_features, r, generator=g) * std
    return LoraWeights(A, B, alpha / r)


class NaiveXCross:
    """The reference of DESIGN 5.3: peft adapters toggled with `set_adapter`, one stream at a time, layer by layer,
    eq. 5 as a Python loop; it reuses the X-Cross model's integrator weights, w and head (same scores)."""

    def __init__(self, backbone: Backbone, loras: list[LoraWeights], model: XCross):
        from peft import get_peft_model

        from model.backbone import LayerRunner
        from model.lora import LoraConfig
        from model.source import peft_config

        cfg = peft_config(backbone, LoraConfig(dropout=0.0))
        self.peft = get_peft_model(backbone.model, cfg, adapter_name="s0")  # wraps `backbone` in place
        for i in range(1, len(loras)):
            self.peft.add_adapter(f"s{i}", peft_config(backbone, LoraConfig(dropout=0.0)))
        with torch.no_grad():
            for name, module in self.peft.named_modules():
                if hasattr(module, "lora_A") and "s0" in module.lora_A:
                    path = name.removeprefix("base_model.model.")
                    for i, lora in enumerate(loras):
                        if abs(module.scaling[f"s{i}"] - lora.scale) > 1e-9:
                            raise ValueError(f"LoRA scale {lora.scale} is not peft's {module.scaling[f's{i}']}")
                        module.lora_A[f"s{i}"].weight.copy_(lora.A[path])
                        module.lora_B[f"s{i}"].weight.copy_(lora.B[path])
        self.peft.eval()
        self.runner = LayerRunner(self.peft.base_model.model, backbone.family)
        self.n, self.model, self.num_layers = len(loras), model, backbone.num_layers

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, cfg = self.n, self.model.config
        h0 = self.runner.embed(ids, mask)
        ctx = self.runner.context(h0, mask)
        hs = [h0] * n
        for l in range(self.num_layers):
            outs = []
            for m in range(n):
                self.peft.base_model.set_adapter(f"s{m}")
                outs.append(self.runner.layer(l, hs[m], ctx, h0))
            if str(l) in self.model.integrators:
                W = self.model.integrators[str(l)].W_concat.weight  # (2n(n-1), n*d)
                z = torch.cat(outs, -1) @ W.T  # (B, T, 2n(n-1))
                refined = []
                for m in range(n):
                    acc = outs[m].clone()
                    for jj, mp in enumerate(j for j in range(n) if j != m):
                        z_direct = z[..., m * (n - 1) + jj, None]
                        z_inter = z[..., n * (n - 1) + m * (n - 1) + jj, None]
                        acc = acc + cfg.beta * z_direct * outs[mp] + cfg.gamma * z_inter * (outs[m] - outs[mp])
                    refined.append(acc)
                outs = refined
            hs = outs
        from model.xcross import pool_tokens

        h_final = sum(self.model.w[m] * pool_tokens(hs[m], mask, cfg.pooling) for m in range(n))
        return self.model.head(h_final)
