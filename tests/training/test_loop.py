"""Training loop: it learns, resumes to the same weights, and 2 gloo processes match 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.lora import LoraConfig
from model.source import SourceLoraModel
from tests.tiny import tiny_backbone
from training.data import load_domain, split_train_val
from training.evaluate import PromptSource
from training.loop import load_best, train, trainable
from training.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]
CFG = replace(PRESETS["smoke"].lora, train_users=None, eval_every=100, save_every=1, max_len=48)


@pytest.fixture(scope="module")
def tools():
    dom = load_domain("Tools")
    train_users, val = split_train_val(dom.train[:200], dom.popularity)
    return dom, train_users[:16], val[:4]


def _model(seed: int = 0) -> SourceLoraModel:
    torch.manual_seed(seed)
    return SourceLoraModel(tiny_backbone("bert"), LoraConfig())


def assert_trained_alike(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float,
                         skip: tuple[str, ...] = ()) -> None:
    """Two trainings of the same examples whose forwards differ only in float summation order (GEMM shapes, ranks,
    kernels) end at the same weights up to Adam's amplification of that noise: at most 1% of each tensor's elements
    (at least one) move by more than `atol`, and the median element moves by less than atol / 10. Adam's first
    steps are sign-like, so the few elements whose gradient is ~0 (lora_A while lora_B is still ~0) may flip on the
    noise; a real difference (a rank's own gradient, other examples) moves most elements (see the gloo test).
    `skip`: tensors not compared."""
    assert a.keys() == b.keys()
    for k in (k for k in a if k not in skip):
        diff = (a[k] - b[k]).abs()
        moved = int((diff > atol).sum())
        detail = f"{k}: {moved} of {diff.numel()} elements moved by > {atol:g}"
        detail += f" (max {diff.max():.2e}, median {diff.median():.2e})"
        assert moved <= max(1, 0.01 * diff.numel()) and diff.median() < atol / 10, detail


def _run(tools, run_dir, **kw):
    dom, users, val = tools
    model = _model()
    source = PromptSource(tiny_backbone().tokenizer, dom.catalog, CFG.max_len)
    state = train(model, source, users, dom.popularity, kw.pop("cfg", CFG), run_dir, val, progress=False, **kw)
    return model, state


def test_resume_after_interruption_gives_the_same_weights(tools, tmp_path):
    full, state = _run(tools, tmp_path / "full")
    assert state.finished and state.step == 4
    part, state = _run(tools, tmp_path / "part", max_steps=2)
    assert not state.finished and state.step == 2
    resumed, state = _run(tools, tmp_path / "part", resume=True)
    assert state.finished and state.step == 4
    a, b = trainable(full), trainable(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    # and training moved the LoRA away from its init
    assert any(trainable(_model())[k].sub(a[k]).abs().max() > 1e-4 for k in a if "lora_B" in k)


def test_best_checkpoint_is_written_and_loadable(tools, tmp_path):
    model, state = _run(tools, tmp_path / "r", cfg=replace(CFG, eval_every=2))
    assert [p["step"] for p in state.curve] == [2, 4] and state.best_step in (2, 4)
    fresh = _model()
    load_best(fresh, tmp_path / "r")
    saved = load_file(tmp_path / "r" / "best.safetensors")
    assert set(saved) == set(trainable(fresh))


def test_resume_without_the_best_weights_says_so_and_keeps_a_model_it_evaluated(tools, tmp_path):
    """A checkout with the state but not best.safetensors: the lost step is not claimed, a later one is kept."""
    cfg = replace(CFG, eval_every=2)
    _run(tools, tmp_path / "r", cfg=cfg, max_steps=2)  # evaluated at step 2: best = step 2
    (tmp_path / "r" / "best.safetensors").unlink()
    logs = []
    model, state = _run(tools, tmp_path / "r", cfg=cfg, resume=True, log=logs.append)
    assert any("WARNING" in m and "weights of step 2" in m for m in logs)
    assert state.finished and state.best_step == 4  # the only evaluation after the resume
    saved = load_file(tmp_path / "r" / "best.safetensors")
    for k, p in trainable(model).items():
        torch.testing.assert_close(saved[k], p.detach(), msg=k)  # step 4's weights = the final ones
    # a finished run resumed without its best weights keeps the final ones, labelled as such
    (tmp_path / "r" / "best.safetensors").unlink()
    _, again = _run(tools, tmp_path / "r", cfg=cfg, resume=True, log=logs.append)
    assert again.best_step == again.step == 4 and (tmp_path / "r" / "best.safetensors").exists()


def test_overfits_a_single_user(tools, tmp_path):
    """Plumbing check: one user repeated, loss goes well below ln(k)."""
    dom, users, _ = tools
    model = _model()
    source = PromptSource(tiny_backbone().tokenizer, dom.catalog, 48)
    cfg = replace(CFG, users_per_step=1, epochs=40, lr=5e-3, head_lr=5e-3, warmup_steps=1, save_every=1000)
    from training.loop import user_loss

    before = user_loss(model, source, dom.popularity, users[0], 0, cfg.prompts_per_user, 0, False).item()
    train(model, source, [users[0]], dom.popularity, cfg, tmp_path / "o", [], progress=False)
    after = user_loss(model, source, dom.popularity, users[0], 0, cfg.prompts_per_user, 0, False).item()
    assert before > 1.5 and after < 0.5 * before


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo) gives the same trained LoRA as one process with the same global batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-m", "training", "train-lora", "--domain", "Tools", "--preset", "smoke", "--quiet"]

    def run(prefix, root):
        args = [
            *prefix,
            *common,
            "--artifacts",
            str(root / "a"),
            "--results",
            str(root / "r"),
            "--runs",
            str(root / "s"),
        ]
        subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
        return load_file(root / "a" / "lora" / "Tools" / "tensors.safetensors")

    one = run([sys.executable], tmp_path / "one")
    two = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"], tmp_path / "two"
    )
    # What a broken reduction looks like (measured on the smoke preset with all_reduce made a no-op, each rank
    # stepping on its own half of the batch): 94% of every tensor's elements differ by more than 0.1 * lr, median
    # difference ~0.8 * lr. What a correct one looks like: the two runs' GEMMs have different shapes and sum in
    # different orders (~1e-7 relative), and Adam's sign-like first steps (lora_B starts at 0, so lora_A's first
    # gradients are ~0 and flip sign on that noise) carry it to a handful of elements: 0 of 443,136 beyond 1e-4 and a
    # median of ~1e-9 on a 2-core EPYC, but single elements past 1e-4 on an AMX Xeon, whose kernels sum differently
    # (one process on 1 vs 2 threads alone moves an element by 6e-5). So the check is on the share of elements that
    # moved, not on the worst one. The scorer bias b_c has a zero gradient under the listwise loss (softmax is
    # shift-invariant): its updates are Adam-normalised float noise of either sign, compared to the lr scale only.
    lr = PRESETS["smoke"].lora.lr
    bias = "head.scorer.bias"
    assert (one[bias] - two[bias]).abs().max() <= 4 * PRESETS["smoke"].lora.head_lr
    assert_trained_alike(one, two, atol=0.1 * lr, skip=(bias,))


def test_lr_restarts_keep_epoch_one_and_restart_the_decay_each_epoch():
    from training.loop import _lr_factor

    one_epoch = [_lr_factor(s, 100, 20) for s in range(100)]
    two_epochs = [_lr_factor(s, 200, 20, cycle=100) for s in range(200)]
    assert two_epochs[:100] == one_epoch  # a one-epoch run resumes into the second epoch unchanged
    assert one_epoch[19] == 1.0 and one_epoch[99] < 0.02  # warm-up, then decay to ~0
    assert two_epochs[100] == 1.0 and two_epochs[150] == 0.5 and two_epochs[199] < 0.02  # restart, no warm-up
    assert [_lr_factor(s, 200, 20) for s in range(200)][100] < 0.6  # without restarts: one long decay


def test_step_batched_training_matches_user_by_user(tools, tmp_path, monkeypatch):
    """The GPU path (a step's users in one forward, padded together) trains the same weights as the CPU path
    (one forward per user), without dropout: same examples, same mean loss."""
    dom, users, val = tools
    source = PromptSource(tiny_backbone().tokenizer, dom.catalog, CFG.max_len)
    weights = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("XCROSS_TRAIN_STEP_BATCH", flag)
        torch.manual_seed(0)
        model = SourceLoraModel(tiny_backbone("bert"), LoraConfig(dropout=0.0))
        state = train(model, source, users, dom.popularity, CFG, tmp_path / flag, val, progress=False)
        assert state.finished and state.step == 4
        weights[flag] = trainable(model)
    # the scorer's bias has a zero gradient in exact arithmetic (eq. 1 is shift-invariant), so AdamW's normalised
    # step on its float-noise gradient is arbitrary: every other weight must match
    assert_trained_alike(weights["1"], weights["0"], atol=2e-5, skip=("head.scorer.bias",))
    assert any(trainable(_model())[k].sub(weights["1"][k]).abs().max() > 1e-4 for k in weights["1"] if "lora_B" in k)


def test_train_device_names_a_missing_gpu(monkeypatch):
    from training.evaluate import train_device

    monkeypatch.setenv("XCROSS_TRAIN_DEVICE", "auto")
    assert train_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("XCROSS_TRAIN_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="XCROSS_TRAIN_DEVICE"):
            train_device()


def test_bf16_is_turned_off_where_the_cpu_only_emulates_it(monkeypatch):
    import service.machine
    from training.__main__ import _ctx
    from training.evaluate import BF16_ENV, bf16_allowed, device_info

    monkeypatch.delenv("XCROSS_TRAIN_DEVICE", raising=False)
    monkeypatch.delenv(BF16_ENV, raising=False)
    monkeypatch.setattr(service.machine, "cpu_bf16_flags", lambda *a: [])  # an AVX2-only CPU
    assert bf16_allowed()[0] is False
    assert "emulates" in device_info()["precision_note"]
    ctx = _ctx("cpu", quiet=True)  # same preset name (runs resume across machines), bf16 off for both stages
    assert ctx.preset.name == "cpu" and not ctx.preset.lora.bf16 and not ctx.preset.xcross.bf16
    monkeypatch.setenv(BF16_ENV, "on")  # forced on: kept, and no note
    assert bf16_allowed()[0] is True and "precision_note" not in device_info()
    assert _ctx("cpu", quiet=True).preset.lora.bf16
    monkeypatch.delenv(BF16_ENV)
    monkeypatch.setattr(service.machine, "cpu_bf16_flags", lambda *a: ["amx_bf16"])  # native bf16: kept
    assert bf16_allowed() == (True, "native bf16 (amx_bf16)") and _ctx("cpu", quiet=True).preset.xcross.bf16
    monkeypatch.setenv(BF16_ENV, "maybe")
    with pytest.raises(ValueError, match="auto, on or off"):
        bf16_allowed()
