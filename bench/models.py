"""What the benchmarks run: real dev requests, checkpoints (trained from `--artifacts`, else freshly initialised
on the real backbone), the models built from them, and the naive peft reference.

Freshly initialised checkpoints (`random_artifacts`): two source LoRAs (Sports, Electronics) with small non-zero
A and B on every adapted module (peft would start B at 0), seeded heads, and an X-Cross Tools model over them
with a random integrator. Timing does not depend on trained values; accuracy numbers from them only measure how
well two backends agree (a random model's Hit@1 is near chance, 1/30).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model.backbone import Backbone
from model.checkpoint import load_model, save_lora, save_xcross
from model.inference import cast_frozen_, optimize_for_inference
from model.lora import LoraWeights
from model.prompts import prompt_text
from model.xcross import Head, XCross, XCrossConfig
from training.data import load_domain
from training.evaluate import PromptSource

TARGET, SOURCES = "Tools", ("Sports", "Electronics")  # paper Table 1: Tools <- Sports + Electronics
LORA_CFG = {"r": 16, "alpha": 32, "dropout": 0.1}


@dataclass
class Request:
    """One dev user's request: 30 prompts (ids, mask), the pairs as text, and where the target is."""

    user: str
    input_ids: torch.Tensor  # (30, T)
    attention_mask: torch.Tensor  # (30, T)
    pairs: list[tuple[str, str]]  # (history text, candidate text) for a cross-encoder
    target: int
    payload: dict  # the same request as a /recommend body

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def dev_requests(backbone: Backbone, n: int, domain: str = TARGET, max_len: int = 256) -> list[Request]:
    """The first `n` dev users of `domain`, each with their 30 fixed candidates."""
    data = load_domain(domain)
    source = PromptSource(backbone.tokenizer, data.catalog, max_len)
    out = []
    for u in data.dev[:n]:
        ids, mask = source.batch(u, u.candidates)
        titles = data.catalog.titles
        history = prompt_text([titles[i] for i in u.history], "").removesuffix(" Candidate: ")
        pairs = [(history, f"Candidate: {titles[c]}") for c in u.candidates]
        payload = {"domain": domain, "history": [{"id": i} for i in u.history],
                   "candidates": [{"id": c} for c in u.candidates], "top_k": len(u.candidates)}
        out.append(Request(u.user, ids, mask, pairs, u.candidates.index(u.target), payload))
    return out


def random_lora(backbone: Backbone, seed: int, std: float = 0.05, layers: set[int] | None = None) -> LoraWeights:
    """Non-zero A and B on the family's target modules (of `layers` only, when given)."""
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name, mod in backbone.model.named_modules():
        if re.fullmatch(backbone.lora_targets, name):
            if layers is not None and int(re.search(r"\.layer\.(\d+)\.", f".{name}").group(1)) not in layers:
                continue
            A[name] = torch.randn(LORA_CFG["r"], mod.in_features, generator=g) * std
            B[name] = torch.randn(mod.out_features, LORA_CFG["r"], generator=g) * std
    return LoraWeights(A, B, LORA_CFG["alpha"] / LORA_CFG["r"])


def random_artifacts(root: Path, backbone: Backbone, top_k: int | None = None, lora_layers: set[int] | None = None,
                     seed: int = 0) -> Path:
    """lora/<source> x 2 and xcross/<TARGET> over them, freshly initialised (see the module doc)."""
    top_k = backbone.num_layers if top_k is None else top_k
    dirs = []
    for s, domain in enumerate(SOURCES):
        torch.manual_seed(seed + s)
        lora = random_lora(backbone, seed + s, layers=lora_layers)
        dirs.append(save_lora(root / "lora" / domain, lora, Head(backbone.hidden_size), backbone, domain=domain,
                              lora_config=LORA_CFG))
    torch.manual_seed(seed + 7)
    loras = [random_lora(backbone, seed + s, layers=lora_layers) for s in range(len(SOURCES))]
    model = XCross(backbone, loras, XCrossConfig(top_k=top_k, init_std=0.02)).eval()
    save_xcross(root / "xcross" / TARGET, model, backbone, target=TARGET, sources=list(zip(SOURCES, dirs, strict=True)))
    return root


def load(artifacts: Path, backbone: Backbone, kind: str = "xcross", form: str = "served",
         bf16_weights: bool = False, packed: bool = True) -> torch.nn.Module:
    """The X-Cross target model (kind "xcross") or the first source LoRA as a one-stream model (kind "lora"), in
    the `form` the CPU service runs ("served": streamwise, LoRA merged), "grouped" (folded streams, optimized
    modules) or "ref" (as model/xcross.py builds it)."""
    domain = TARGET if kind == "xcross" else SOURCES[0]
    model, _ = load_model(artifacts / kind / domain, backbone, search=[artifacts / "lora"])
    if form != "ref":
        model = optimize_for_inference(model, streamwise=form == "served", packed=packed)
    return cast_frozen_(model, torch.bfloat16) if bf16_weights else model.eval()


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
        h_final = sum(self.model.w[m] * hs[m][:, 0] for m in range(n))
        return self.model.head(h_final)


def source_loras(artifacts: Path, backbone: Backbone, domain: str = TARGET) -> list[LoraWeights]:
    """The source LoRAs an X-Cross checkpoint names, in stream order."""
    from model.checkpoint import load_lora, read_manifest, resolve_source

    d = artifacts / "xcross" / domain
    refs = read_manifest(d)["sources"]
    return [load_lora(resolve_source(ref, d, [artifacts / "lora"]), backbone)[0] for ref in refs]
