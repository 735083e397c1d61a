"""Training cost (issue 15): one optimizer step of 8 real Tools train users x 10 prompts, as the `cpu` preset trains
(forward, backward, AdamW), over the inference forward of the same prompts with the same model and precision,
paired in interleaved rounds (each round a new step of 8 users; both sides see that round's prompts).

    python -m bench.training [--reps 5] [--profile] [--xcross]     # prints a table, then one JSON line

Models timed side by side:
  fast    model/fast_lora.py, as the `cpu` preset trains now: no dropout, LoRA on the top `lora_layers` layers, packed
          real-token layers, the step's prompts in one forward
  peft    the first wave's path: peft LoRA on all 6 layers in train mode (dropout 0.1 on the base and the LoRA
          input), gradients accumulated user by user, each user's prompts padded to that user's longest
  fast_step_sdpa  the fast step with the fused attention kernel where gradients flow (the default is the matmul
          form, model/inference.py `attention`): `train_math_attention_speedup` = its time over the fast step's
  xcross  (full runs) X-Cross training over two fast-trained source LoRAs: the packed streamwise form with the
          integrators, w and the head trainable, vs the model as built (train mode, base dropout), same steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.timing import interleave, median, ratio

USERS_PER_STEP, PROMPTS = 8, 10


def _steps(tokenizer, n_steps: int, max_len: int = 128, seed: int = 0):
    """`n_steps` steps of real Tools train users with their training candidates (1 positive + 9 negatives)."""
    from training.data import load_domain
    from training.evaluate import PromptSource
    from training.loop import training_candidates

    dom = load_domain("Tools")
    source = PromptSource(tokenizer, dom.catalog, max_len)
    users = dom.train[: n_steps * USERS_PER_STEP]
    steps = []
    for s in range(n_steps):
        pairs = [(u, training_candidates(dom.popularity, u, s * USERS_PER_STEP + i, PROMPTS, seed))
                 for i, u in enumerate(users[s * USERS_PER_STEP : (s + 1) * USERS_PER_STEP])]
        steps.append({"one": source.batch_many(pairs), "per_user": [source.batch(u, c) for u, c in pairs]})
    return steps


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def step_and_forward(model: torch.nn.Module, batches: Callable[[int], list], bf16: bool, lr: float = 2e-4):
    """(step(i), forward(i)) callables for one model: an AdamW step over round i's batches, and their forward."""
    from model.xcross import listwise_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def step(i: int) -> float:
        model.train()
        parts, total = batches(i), 0.0
        for ids, mask in parts:
            with _autocast(bf16):
                scores = model(ids, mask)
            loss = listwise_loss(scores, PROMPTS) * (ids.shape[0] / (USERS_PER_STEP * PROMPTS))
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    @torch.inference_mode()
    def forward(i: int) -> None:
        model.eval()
        for ids, mask in batches(i):
            with _autocast(bf16):
                model(ids, mask)

    return step, forward


def build(backbone_factory, lora_layers: int = 3, bf16: bool = True):
    """The fast and the peft source-LoRA trainers on fresh backbones (peft wraps its backbone in place)."""
    from dataclasses import replace

    from training.pipeline import source_model
    from training.presets import PRESETS

    cfg = replace(PRESETS["cpu"].lora, lora_layers=lora_layers, bf16=bf16)
    torch.manual_seed(0)
    fast, _ = source_model(backbone_factory(), cfg)
    peft, _ = source_model(backbone_factory(), replace(cfg, fast_path=False, lora_layers=0, pooling="cls"))
    return fast, peft


def xcross_pair(backbone_factory, lora_layers: int = 3, bf16: bool = True):
    """X-Cross training forms over two random top-`lora_layers` LoRAs: (fast training form, as built)."""
    from model.fast_lora import FastLoraModel
    from model.fast_lora import xcross_training_form as training_form
    from model.lora import LoraConfig
    from model.xcross import XCross, XCrossConfig

    bb = backbone_factory()
    loras = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = FastLoraModel(bb, LoraConfig(dropout=0.0), top_k=lora_layers)
        with torch.no_grad():
            for lora in m.loras.values():
                lora.lora_B.normal_(0, 0.01)
        loras.append(m.lora_weights())
    cfg = XCrossConfig(n_streams=2, top_k=lora_layers)
    torch.manual_seed(0)
    built = XCross(bb, loras, cfg)
    torch.manual_seed(0)
    fast = training_form(XCross(backbone_factory(), loras, cfg))  # as the pipeline: shared weights stay fp32
    return fast, built


def _with_attention(step: Callable[[int], Any], kernel: str) -> Callable[[int], Any]:
    """`step` with the training attention kernel set to `kernel` (model/inference.py `TRAIN_ATTENTION`)."""
    from model import inference

    def run_step(i: int) -> Any:
        before = inference.TRAIN_ATTENTION["kernel"]
        inference.TRAIN_ATTENTION["kernel"] = kernel
        try:
            return step(i)
        finally:
            inference.TRAIN_ATTENTION["kernel"] = before

    return run_step


def run(reps: int = 5, bf16: bool | None = None, with_xcross: bool = False, profile: bool = False,
        lora_layers: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    from model.backbone import load_backbone, minilm_tokenizer
    from service.machine import describe

    machine = describe()
    native = any(machine["flags"].get(f) for f in ("amx_bf16", "avx512_bf16"))
    bf16 = native if bf16 is None else bf16
    fast, peft = build(lambda: load_backbone("minilm"), lora_layers, bf16)
    steps = _steps(minilm_tokenizer(), reps)
    fast_step, fast_fwd = step_and_forward(fast, lambda i: [steps[i]["one"]], bf16)
    peft_step, peft_fwd = step_and_forward(peft, lambda i: steps[i]["per_user"], bf16)
    variants = {"fast_step": fast_step, "fast_forward": fast_fwd, "peft_step": peft_step, "peft_forward": peft_fwd,
                "fast_step_sdpa": _with_attention(fast_step, "sdpa")}
    keys: dict[str, Any] = {}
    details: dict[str, Any] = {"cpu": machine["cpu"], "bf16": bf16, "lora_layers": lora_layers,
                               "threads": torch.get_num_threads(), "reps": reps}
    if with_xcross:
        xf, xb = xcross_pair(lambda: load_backbone("minilm"), lora_layers, bf16)
        variants.update(zip(("xcross_step", "xcross_forward"),
                            step_and_forward(xf, lambda i: [steps[i]["one"]], bf16, lr=1e-3), strict=True))
        variants["xcross_step_sdpa"] = _with_attention(variants["xcross_step"], "sdpa")
        variants.update(zip(("xcross_built_step", "xcross_built_forward"),
                            step_and_forward(xb, lambda i: steps[i]["per_user"], bf16, lr=1e-3), strict=True))
    times = interleave(variants, reps=reps, warmup=1)
    prompts = USERS_PER_STEP * PROMPTS
    tokens = sum(int(s["one"][1].sum()) for s in steps) / reps
    keys["train_step_over_forward"] = ratio(times, "fast_step", "fast_forward")
    keys["train_prompts_per_s"] = prompts / median(times["fast_step"])
    keys["train_step_over_forward_peft"] = ratio(times, "peft_step", "peft_forward")
    keys["train_prompts_per_s_peft"] = prompts / median(times["peft_step"])
    keys["train_fast_over_peft"] = ratio(times, "peft_step", "fast_step")
    keys["train_math_attention_speedup"] = ratio(times, "fast_step_sdpa", "fast_step")  # fused kernel / matmul form
    if with_xcross:
        keys["xcross_train_step_over_forward"] = ratio(times, "xcross_step", "xcross_forward")
        keys["xcross_train_prompts_per_s"] = prompts / median(times["xcross_step"])
        keys["xcross_train_fast_over_built"] = ratio(times, "xcross_built_step", "xcross_step")
        keys["xcross_train_math_attention_speedup"] = ratio(times, "xcross_step_sdpa", "xcross_step")
    details["median_s"] = {k: round(median(v), 4) for k, v in times.items()}
    details["tokens_per_step"] = tokens
    if profile:
        details["profile"] = {"peft": top_ops(peft_step), "fast": top_ops(fast_step)}
    return keys, details


def top_ops(step: Callable[[int], Any], rounds: int = 2, n: int = 8) -> list[dict[str, Any]]:
    """The top ops by self CPU time over `rounds` steps: name and share of the total."""
    from torch.profiler import ProfilerActivity, profile

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(rounds):
            step(i)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3)} for e in events[:n]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--xcross", action="store_true", help="also X-Cross training (fast form vs as built)")
    p.add_argument("--profile", action="store_true", help="top ops of a step, peft path and fast path")
    p.add_argument("--fp32", action="store_true", help="fp32 even where the CPU has native bf16")
    p.add_argument("--lora-layers", type=int, default=3, help="LoRA on the top N layers in the fast path")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    keys, details = run(args.reps, False if args.fp32 else None, args.xcross, args.profile, args.lora_layers)
    for k, v in sorted(keys.items()):
        print(f"{k:34s} {v:.4g}")
    print(json.dumps({**keys, "details": details, "seconds": round(time.perf_counter() - t0, 1)}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
