"""What the benchmarks run: real dev requests, checkpoints (trained from `--artifacts`, else freshly initialised
on the real backbone), the models built from them, and the naive peft reference.

Freshly initialised checkpoints (`random_artifacts`): two source LoRAs (Sports, Electronics) with small non-zero
A and B on every adapted module (peft would start B at 0), seeded heads, and an X-Cross Tools model over them
with a random integrator. Timing does not depend on trained values; accuracy numbers from them only measure how
well two backends agree (a random model's Hit@1 is near chance, 1/30).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.backbone import Backbone
from model.checkpoint import load_model, save_lora, save_xcross
from model.inference import optimize_for_inference, serve_bf16_
from model.lora import LoraWeights
from model.prompts import prompt_text
from model.reference import random_lora
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
    return serve_bf16_(model) if bf16_weights else model.eval()


def source_loras(artifacts: Path, backbone: Backbone, domain: str = TARGET) -> list[LoraWeights]:
    """The source LoRAs an X-Cross checkpoint names, in stream order."""
    from model.checkpoint import load_lora, read_manifest, resolve_source

    d = artifacts / "xcross" / domain
    refs = read_manifest(d)["sources"]
    return [load_lora(resolve_source(ref, d, [artifacts / "lora"]), backbone)[0] for ref in refs]
