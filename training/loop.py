"""The training loop shared by source LoRAs and X-Cross: listwise loss (eq. 1) over 1 positive + k-1 popularity
negatives per user, gradients accumulated user by user (each user's prompts padded only to that user's longest),
AdamW with linear warm-up and decay, periodic evaluation on validation users (best checkpoint, early stopping),
resumable state in safetensors, and data parallelism under `torchrun` (gloo on CPU, nccl on GPU).

Determinism: the user order of epoch e is a permutation seeded by (seed, e); the negatives of the user at global
position i are seeded by (seed, i). A resumed or multi-process run sees exactly the same examples.
Multi-process: rank r takes every world-th user of a step; gradients are summed with all_reduce, so the update
equals the single-process update on the same global batch (tested).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from model.fast_lora import frozen_eval_
from model.xcross import listwise_loss
from training.data import PopularitySampler, User
from training.evaluate import PromptBatches, autocast, evaluate_users, step_batched, to_device
from training.presets import TrainConfig

# train-count per item of the users' domain: one array, or per user (mixed-domain data, training/variants.py)
Popularity = np.ndarray | Callable[[User], np.ndarray]


@dataclass
class RunState:
    step: int = 0
    best: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    finished: bool = False
    wall_s: float = 0.0
    curve: list[dict] = field(default_factory=list)


def dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(path)


def save_state(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, state: RunState) -> None:
    params = trainable(model)
    tensors = {f"param.{k}": p for k, p in params.items()}
    names = {id(p): k for k, p in params.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    _save_atomic(tensors, run_dir / "state.safetensors")
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(run_dir / "state.json")


def load_state(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> RunState:
    tensors = load_file(run_dir / "state.safetensors")
    params = trainable(model)
    missing = [k for k in params if f"param.{k}" not in tensors]
    if missing:
        raise RuntimeError(f"{run_dir}: resume state does not match the model (missing {missing[:3]}); "
                           "use a new --run-dir or drop --resume")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    for k, p in params.items():
        st = {key.rsplit(".", 1)[1]: v for key, v in tensors.items() if key.startswith(f"opt.{k}.")}
        if st:  # moments on the parameter's device; the step count stays a CPU scalar (AdamW's default)
            opt.state[p] = {"step": st["step"], "exp_avg": st["exp_avg"].to(p.device),
                            "exp_avg_sq": st["exp_avg_sq"].to(p.device)}
    return RunState(**json.loads((run_dir / "state.json").read_text()))


def _lr_factor(step: int, total: int, warmup: int, cycle: int | None = None) -> float:
    """Linear warm-up, then linear decay to 0 at `total`; with `cycle` (steps per epoch), the decay restarts at
    every epoch (warm restarts, no second warm-up), so epoch 1 is the same as a one-epoch run's."""
    if step < warmup:
        return (step + 1) / warmup
    if cycle and step >= cycle:
        return (cycle - step % cycle) / cycle
    end = min(total, cycle) if cycle else total
    return max(0.0, (end - step) / max(1, end - warmup))


def schedule(users: list[User], cfg: TrainConfig, seed: int) -> list[tuple[int, User]]:
    """(global position, user) in training order over all epochs."""
    order, epochs = [], math.ceil(cfg.epochs)
    n_total = int(round(len(users) * cfg.epochs))
    for e in range(epochs):
        perm = np.random.default_rng([seed, e]).permutation(len(users))
        order += [users[i] for i in perm]
    return list(enumerate(order[:n_total]))


def training_candidates(popularity: Popularity, user: User, position: int, k: int, seed: int) -> list[int]:
    """The positive first, then k-1 popularity negatives seeded by (seed, global position)."""
    pop = popularity(user) if callable(popularity) else popularity  # mixed-domain data: the user's own domain
    sampler = PopularitySampler(pop, seed=[seed, position])
    return [user.target, *sampler.sample(set(user.items), k - 1)]


def _seed_dropout(seed: int, position: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence([seed, position]).generate_state(1)[0]))


def user_loss(model: nn.Module, source: PromptBatches, popularity: Popularity, user: User, position: int,
              k: int, seed: int, bf16: bool) -> torch.Tensor:
    """Eq. 1 for one user (the CPU path: each user's prompts padded only to that user's longest)."""
    return step_loss(model, source, popularity, [(position, user)], k, seed, bf16)


def step_loss(model: nn.Module, source: PromptBatches, popularity: Popularity, step_users: list[tuple[int, User]],
              k: int, seed: int, bf16: bool) -> torch.Tensor:
    """The mean of eq. 1 over users in one forward (the GPU path: a whole step; dropout masks seeded by the
    first user's position)."""
    _seed_dropout(seed, step_users[0][0])
    ids, mask = source.batch_many([(u, training_candidates(popularity, u, pos, k, seed)) for pos, u in step_users])
    with autocast(bf16):
        scores = model(ids, mask)
    return listwise_loss(scores, group=k)  # (eq. 1), mean over users


def train(model: nn.Module, source: PromptBatches, users: list[User], popularity: Popularity, cfg: TrainConfig,
          run_dir: Path, eval_users: list[User], seed: int = 0, resume: bool = False, progress: bool = True,
          head_prefix: str = "head.", log=print, max_steps: int | None = None) -> RunState:
    """Train the model's trainable parameters; the best (by validation MRR@10) weights end in best.safetensors.

    `max_steps` stops this invocation after that many optimizer steps (state saved; continue with resume=True).
    """
    rank, world = dist_world()
    run_dir.mkdir(parents=True, exist_ok=True)
    to_device(model)
    batched = step_batched() or (cfg.fast_path and getattr(model, "step_batched", False))
    params = trainable(model)
    groups = [
        {"params": [p for k, p in params.items() if not k.startswith(head_prefix)], "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": [p for k, p in params.items() if k.startswith(head_prefix)], "lr": cfg.head_lr,
         "base_lr": cfg.head_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    state = RunState()
    if resume and (run_dir / "state.json").exists():
        state = load_state(run_dir, model, opt)
        log(f"resumed {run_dir} at step {state.step}")
        if state.best_step >= 0 and not (run_dir / "best.safetensors").exists():
            # the kept weights were lost (e.g. a checkout with the state committed but not best.safetensors): say so
            # and keep the best of the evaluations from here on, or the final weights, never a silent mislabel
            log(f"WARNING: {run_dir / 'best.safetensors'} (the weights of step {state.best_step}, validation "
                f"MRR@10 {state.best:.2f}) is missing; the run keeps the best of its evaluations from step "
                f"{state.step} on (commit best.safetensors with the state to avoid this)")
            state.best, state.best_step, state.evals_since_best = -1.0, -1, 0
    plan = schedule(users, cfg, seed)
    total = math.ceil(len(plan) / cfg.users_per_step)
    cycle = math.ceil(len(users) / cfg.users_per_step) if cfg.lr_restarts else None
    bar = tqdm(total=total, initial=state.step, desc=run_dir.name, disable=not progress or rank != 0)
    t0 = time.time() - state.wall_s
    stop, end = False, total if max_steps is None else min(total, state.step + max_steps)
    while state.step < end and not stop:
        model.train()
        if cfg.fast_path:
            frozen_eval_(model)  # no dropout on the frozen base
        step_users = plan[state.step * cfg.users_per_step : (state.step + 1) * cfg.users_per_step]
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(state.step, total, cfg.warmup_steps, cycle)
        loss_sum, mine = 0.0, step_users[rank::world]
        if batched and mine:  # one forward for the step: (mean loss) * (my share of the users)
            loss = step_loss(model, source, popularity, mine, cfg.prompts_per_user, seed, cfg.bf16)
            (loss * len(mine) / len(step_users)).backward()
            loss_sum = loss.item() * len(mine)
        for pos, user in ([] if batched else mine):
            loss = user_loss(model, source, popularity, user, pos, cfg.prompts_per_user, seed, cfg.bf16)
            (loss / len(step_users)).backward()
            loss_sum += loss.item()
        if world > 1:
            for p in params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / max(1, len(step_users[rank::world])):.3f}")
        if rank == 0 and eval_users and (state.step % cfg.eval_every == 0 or state.step == total):
            stop = _evaluate(model, source, eval_users, cfg, state, run_dir, t0, progress, log)
        if world > 1:
            flag = torch.tensor([int(stop)], device=next(iter(params.values())).device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if rank == 0 and (state.step % cfg.save_every == 0 or state.step in (total, end) or stop):
            state.wall_s = time.time() - t0
            save_state(run_dir, model, opt, state)
    bar.close()
    state.wall_s = time.time() - t0
    state.finished = state.step >= total or stop
    if rank == 0:
        save_state(run_dir, model, opt, state)
        if not (run_dir / "best.safetensors").exists():  # no evaluation kept one: the final weights are the model
            _save_atomic(trainable(model), run_dir / "best.safetensors")
            state.best_step = state.step
            save_state(run_dir, model, opt, state)
    return state


def _evaluate(model, source, eval_users, cfg, state: RunState, run_dir: Path, t0: float, progress, log) -> bool:
    model.eval()
    res = evaluate_users(model, source, eval_users, bf16=cfg.bf16, progress=progress, desc="val")
    m, orth = res["metrics"], res.get("orthogonality")  # GCA models: mean |cos(X, A)| per layer
    point = {"step": state.step, "users_seen": state.step * cfg.users_per_step, "wall_s": round(time.time() - t0, 1),
             **{k: round(v, 2) for k, v in m.items() if k != "n_users"}, **({"orthogonality": orth} if orth else {})}
    state.curve.append(point)
    log(f"step {state.step}: val hit@1 {m['hit@1']:.2f} mrr@10 {m['mrr@10']:.2f}"
        + (f" |cos(X, A)| {orth}" if orth else ""))
    if m["mrr@10"] > state.best:
        state.best, state.best_step, state.evals_since_best = m["mrr@10"], state.step, 0
        _save_atomic(trainable(model), run_dir / "best.safetensors")
    else:
        state.evals_since_best += 1
    model.train()
    return bool(cfg.patience) and state.evals_since_best >= cfg.patience


def load_best(model: nn.Module, run_dir: Path) -> None:
    tensors = load_file(run_dir / "best.safetensors")
    with torch.no_grad():
        for k, p in trainable(model).items():
            p.copy_(tensors[k])
