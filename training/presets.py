"""Named training presets: `smoke` (tests, seconds), `cpu` (2-core budget), `paper` (the paper's protocol, GPU).

Every deviation of `cpu` from the paper is listed in `DEVIATIONS` and recorded in each result file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class TrainConfig:
    train_users: int | None  # random subset of the target's train users (after the validation split); None = all
    prompts_per_user: int  # 1 positive + (k - 1) popularity negatives per user in training (eq. 1 over k)
    users_per_step: int  # users per optimizer step (gradients accumulated user by user)
    epochs: float
    lr: float  # LoRA / integrator learning rate (AdamW)
    head_lr: float  # pooler + scorer learning rate
    weight_decay: float
    warmup_steps: int  # linear warm-up, then linear decay to 0
    max_len: int
    bf16: bool  # bf16 autocast for the encoder; head, scores and loss stay fp32
    eval_every: int  # optimizer steps between evaluations on the validation users
    eval_users: int  # validation users per evaluation (early stopping / best checkpoint)
    dev_users: int | None  # dev users for the final reported metrics; None = all
    patience: int  # evaluations without improvement before stopping early (0 = never)
    save_every: int  # optimizer steps between resumable checkpoints
    lora_layers: int = 0  # source LoRAs on the top-k layers only (0 = every layer); lower layers then run once
    lr_restarts: bool = False  # restart the linear decay at every epoch (epoch 1 = a one-epoch run's schedule)
    fast_path: bool = True  # model/fast_lora.py: no dropout, packed layers, a step's prompts in one forward; False =
    #                         the first wave's peft path (dropout 0.1 on base and LoRA, users one by one)
    pooling: str = "cls"  # source LoRAs' head input: "cls" (eq. 7 on [CLS]) or "mean" (masked token mean)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    lora: TrainConfig
    xcross: TrainConfig
    top_k: int  # X-Cross integrated layers (MiniLM has 6)
    floor_users: int | None  # dev users for the zero-shot floor / zero-shot matrix; None = all (issue 16)
    low_data_sizes: tuple[int, ...] = (50, 100, 200, 500, 1000)  # train users per low-data run
    low_data_seeds: tuple[int, ...] = (0, 1, 2)  # random subsets per size
    base: str = ""  # the named preset this one was derived from with --set (empty: itself)
    overrides: tuple[str, ...] = ()  # the --set items applied to it


_SMOKE = TrainConfig(
    train_users=16, prompts_per_user=6, users_per_step=4, epochs=1, lr=1e-3, head_lr=1e-3, weight_decay=0.01,
    warmup_steps=1, max_len=64, bf16=False, eval_every=2, eval_users=4, dev_users=6, patience=0, save_every=2,
)

# cpu (second wave, 2026-12-01; docs/training.md "Second wave"): the fast training path (model/fast_lora.py: no
# dropout, LoRA on the top 3 of MiniLM's 6 layers as the paper adapts the top 9 of DeBERTa's 12, packed layers, a
# step's prompts in one length-bucketed forward, frozen weights in bf16; it learned faster per example than the first
# wave's path on validation users), all train users for two epochs, 1 positive + 9 popularity negatives per user
# (30 in evaluation, always), 8 users per step, AdamW 2e-4 with 100 warm-up steps and linear decay, max_len 128.
# Mean pooling and a 10x head learning rate are under test on validation users (docs/training.md): not chosen yet.
_CPU_LORA = TrainConfig(
    train_users=None, prompts_per_user=10, users_per_step=8, epochs=2, lr=2e-4, head_lr=2e-4, weight_decay=0.01,
    warmup_steps=100, max_len=128, bf16=True, eval_every=500, eval_users=1000, dev_users=None, patience=0,
    save_every=25, lora_layers=3, pooling="cls",
)
# X-Cross on cpu: only the integrators (+ w, head) train, from W_concat ~ 0 and the best source's head, so it starts
# at the sources' level; all target users, up to three epochs with early stopping on validation MRR@10, a larger
# rate for the freshly initialised integrators than the paper's 5e-5 at 1 user per step; integrated on the top 3
# layers, where the sources' LoRAs are (the lower 3 run once for both streams). Validated every 1,000 steps (8,000
# users, about one Tools epoch; 2026-12-02: at 500 validation was a third of an X-Cross run's CPU time), stopping
# after 2 evaluations without improvement.
_CPU_XCROSS = replace(_CPU_LORA, epochs=3, lr=1e-3, warmup_steps=25, eval_every=1000, patience=2)

# cpu-wave1: the first wave's recipe (what artifacts/ shipped until the second wave), kept to reproduce it: peft LoRA
# on all 6 layers with dropout 0.1, users one by one, 10 prompts per user, two epochs of at most 9,000 users (the
# decay restarted at epoch 2), [CLS] pooling, head lr 2e-4; X-Cross on 2,000 users for one epoch, all 6 layers.
_WAVE1_LORA = TrainConfig(
    train_users=9000, prompts_per_user=10, users_per_step=8, epochs=2, lr=2e-4, head_lr=2e-4, weight_decay=0.01,
    warmup_steps=200, max_len=128, bf16=True, eval_every=250, eval_users=300, dev_users=500, patience=0,
    save_every=25, lr_restarts=True, fast_path=False,
)
_WAVE1_XCROSS = replace(_WAVE1_LORA, train_users=2000, epochs=1, lr_restarts=False, lr=1e-3, head_lr=2e-4,
                        warmup_steps=25, eval_every=125)

_PAPER_LORA = TrainConfig(
    train_users=None, prompts_per_user=30, users_per_step=8, epochs=3, lr=2e-4, head_lr=2e-4, weight_decay=0.01,
    warmup_steps=200, max_len=256, bf16=True, eval_every=500, eval_users=1000, dev_users=None, patience=0,
    save_every=200,
)
_PAPER_XCROSS = replace(
    _PAPER_LORA, users_per_step=1, epochs=40, lr=5e-5, head_lr=5e-5, warmup_steps=0, eval_every=2000, patience=5,
    save_every=1000,
)

PRESETS = {
    "smoke": Preset("smoke", _SMOKE, _SMOKE, top_k=2, floor_users=4, low_data_sizes=(4, 8), low_data_seeds=(0,)),
    "cpu": Preset("cpu", _CPU_LORA, _CPU_XCROSS, top_k=3, floor_users=None),
    "cpu-wave1": Preset("cpu-wave1", _WAVE1_LORA, _WAVE1_XCROSS, top_k=6, floor_users=300),
    "paper": Preset("paper", _PAPER_LORA, _PAPER_XCROSS, top_k=6, floor_users=None,
                     low_data_sizes=(50, 75, 100, 200, 300, 400, 500, 750, 1000), low_data_seeds=(0, 1, 2, 3, 4)),
}

DEVIATIONS = {
    "cpu": [
        "MiniLM-L6 backbone (paper: DeBERTa-v3-base); LoRA and X-Cross integration on the top 3 of its 6 layers "
        "(paper: the top 9 of 12)",
        "no dropout: the frozen base runs in eval mode and the LoRA branch has no input dropout (peft's default 0.1; "
        "measured on validation users, docs/training.md)",
        "source LoRAs: two epochs of all train users, 10 prompts per training user (1 positive + 9 popularity "
        "negatives; paper: 30, which learned slower per training prompt on validation users: docs/training.md); "
        "evaluation always uses 30",
        "AdamW lr 2e-4, 8 users per step, 100 warm-up steps, linear decay, for the LoRAs",
        "X-Cross: up to three epochs of all target users, validated every 1,000 steps with early stopping (patience 2 "
        "evaluations), 8 users per step, AdamW lr 1e-3 (head 2e-4), 25 warm-up steps (paper: 40 epochs, lr 5e-5, "
        "1 user per step)",
        "-Experts ablation as in the paper's text (beta = 0, gamma = 0.4, both streams)",
        "max_len 128 tokens (oldest history items dropped beyond it)",
        "bf16 autocast for the encoder, frozen weights stored in bf16 (head and loss in fp32)",
        "validation: at most 1,000 users split from train (all of them where a domain has fewer)",
        "every dev metric (LoRAs, X-Cross, baselines, the zero-shot matrix and floor) on all dev users",
    ],
    "cpu-wave1": [
        "source LoRAs: two epochs of at most 9,000 train users per domain, the linear decay restarting at epoch 2 "
        "(one epoch did not beat the zero-shot floor on Tools: docs/training.md); paper: all users, 40 epochs for "
        "X-Cross",
        "10 prompts per training user (1 positive + 9 popularity negatives; paper: 30); evaluation always uses 30",
        "AdamW lr 2e-4, 8 users per step, 200 warm-up steps, linear decay, for the LoRAs",
        "X-Cross: one epoch of 2,000 target users, 8 users per step, AdamW lr 1e-3 (head 2e-4), 25 warm-up steps "
        "(paper: all users, 40 epochs, lr 5e-5, 1 user per step, early stopping)",
        "-Experts ablation as in the paper's text (beta = 0, gamma = 0.4, both streams)",
        "max_len 128 tokens (oldest history items dropped beyond it)",
        "bf16 autocast for the encoder (head and loss in fp32)",
        "dev metrics on the first 500 dev users; the zero-shot matrix on the first 300",
        "MiniLM-L6 backbone (paper: DeBERTa-v3-base), integration on all 6 layers",
    ],
}


def get_preset(name: str, overrides: list[str] = (), tag: str | None = None) -> Preset:
    """A named preset, optionally with `field=value` / `lora.field=value` / `xcross.field=value` overrides.

    Overridden presets must carry a `tag`; they are named `<preset>-<tag>` in run directories and results.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if not overrides:
        return preset if tag is None else replace(preset, name=f"{name}-{tag}", base=name)
    if not tag:
        raise ValueError("--set overrides need a --tag, so that their runs and results do not pass for the preset")
    lora, xcross = preset.lora, preset.xcross
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: use field=value, e.g. lr=2e-3 or lora.users_per_step=4")
        scope, _, field = key.rpartition(".")
        if scope not in ("", "lora", "xcross") or field not in TrainConfig.__dataclass_fields__:
            raise ValueError(f"--set {item!r}: unknown field; fields: {', '.join(TrainConfig.__dataclass_fields__)}")
        value = _parse(raw, getattr(lora, field))
        if scope in ("", "lora"):
            lora = replace(lora, **{field: value})
        if scope in ("", "xcross"):
            xcross = replace(xcross, **{field: value})
    return replace(preset, name=f"{name}-{tag}", lora=lora, xcross=xcross, base=name, overrides=tuple(overrides))


def _parse(raw: str, current):
    if raw.lower() == "none":
        return None
    if isinstance(current, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(current, int) or current is None:
        return int(float(raw))
    return type(current)(raw)
