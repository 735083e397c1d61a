"""A disk cache of the frozen lower layers' output for evaluation (issue 16: evaluation is most of the retrain's cost).

Every `cpu`-preset model adapts only the top layers of the backbone (source LoRAs on the top 3 of MiniLM's 6, X-Cross
integrating there too), so for a given prompt the lower layers compute the same activations in every model and at
every evaluation: a LoRA's validation every 500 steps, the zero-shot matrix's 16 cells, X-Cross, its baselines and
ablations, the low-data runs. This cache stores those packed activations (fp32, exactly what the model would have
computed) once per user and prompt set, and evaluation runs only the layers above them: half of a LoRA's
evaluation forward, a third of X-Cross's.

A model takes part when it has `frozen_prefix()` (how many lowest layers are the plain base), `prefix(ids, mask)`
and `score_from_prefix(h, packing)` (model/fast_lora.py, model/inference.py) and runs on the CPU. Shards hold
`SHARD` users each, named by a hash of everything that decides their content (backbone, depth, activation dtype,
autocast, and every token of every prompt), so a change of data, prompt format or max_len can only miss, never
return stale activations; several processes may build the same shard (identical content, atomic rename).

`XCROSS_PREFIX_CACHE`: unset = `<runs root>/prefix-cache`; `off` = disabled; else the directory.
`XCROSS_PREFIX_CACHE_GB` (default 40): no new shard is written past this size, nor when the disk has under 2 GB
left (evaluation then computes as usual); a damaged or unreadable shard counts as a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.inference import Packing

ENV = "XCROSS_PREFIX_CACHE"
GB_ENV = "XCROSS_PREFIX_CACHE_GB"
SHARD = 50  # users per shard (~4 MB of fp32 activations per user of 30 MiniLM prompts)
MAX_ROWS = 32  # the models' `bucket`: a larger batch is scored in length-sorted chunks, not as one packing


def cache_dir() -> Path | None:
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return Path(value)
    from training.pipeline import Paths  # late: pipeline imports evaluate, which imports this module

    return Paths().runs / "prefix-cache"


def _dir_bytes(d: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(d) if e.is_file())


def supports(scorer: object) -> bool:
    """Whether `scorer` can be evaluated from cached prefixes (a packed model with frozen base layers, on the CPU)."""
    need = ("frozen_prefix", "prefix", "score_from_prefix")
    if not all(callable(getattr(scorer, n, None)) for n in need) or scorer.frozen_prefix() <= 0:
        return False
    p = next(iter(scorer.parameters()), None) if isinstance(scorer, torch.nn.Module) else None
    return p is None or p.device.type == "cpu"


def _frozen(scorer: object) -> torch.nn.Module:
    return getattr(scorer, "_form", [scorer])[0]  # the training form keeps its frozen layers out of its modules


def signature(scorer: object, bf16: bool) -> str:
    """What the prefix depends on besides the tokens: every tensor it reads (the embeddings and the first
    `frozen_prefix()` layers, `prefix_tensors()`), as bf16 autocast sees them (rounded to bf16) or, in fp32, as
    stored; the depth, the activations' dtype, autocast and this code's version. Under bf16 autocast, weights
    stored in fp32 or in bf16 compute the same prefix (tested), so they share a cache."""
    m = _frozen(scorer)
    h = hashlib.sha256()
    for t in m.prefix_tensors():
        t = t.detach()
        t = t.to(torch.bfloat16).view(torch.int16) if bf16 else t.float()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.cpu().contiguous().numpy().tobytes())
    return f"w={h.hexdigest()[:24]}|depth={scorer.frozen_prefix()}|dtype={getattr(m, 'dtype', None)}|bf16={bf16}|v2"


class PrefixCache:
    """The cached prefixes of one evaluation (a scorer on its users' padded batches, `batches`), shard by shard."""

    def __init__(self, directory: Path, scorer: object, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 bf16: bool):
        self.dir, self.scorer, self.batches = directory, scorer, batches
        self.dir.mkdir(parents=True, exist_ok=True)
        sig = signature(scorer, bf16).encode()
        self.keys: list[str] = []
        self.sizes: list[int] = []
        for s in range(0, len(batches), SHARD):
            self.sizes.append(len(batches[s:s + SHARD]))
            h = hashlib.sha256(sig)
            for ids, mask in batches[s:s + SHARD]:
                h.update(str(tuple(ids.shape)).encode())
                h.update(ids.numpy().tobytes())
                h.update(mask.numpy().tobytes())
            self.keys.append(h.hexdigest()[:32])
        self.limit = float(os.environ.get(GB_ENV, "40")) * 1e9
        self._shard, self._open, self._pending = -1, None, {}
        self.hits = self.misses = 0

    def _path(self, shard: int) -> Path:
        return self.dir / f"{self.keys[shard]}.safetensors"

    def scores(self, i: int) -> torch.Tensor:
        """The scorer's scores of user `i`'s batch, from the cache when its shard is there."""
        ids, mask = self.batches[i]
        shard, j = divmod(i, SHARD)
        if shard != self._shard:
            self._flush()
            self._shard = shard
            path = self._path(shard)
            try:
                self._open = safe_open(str(path), "pt") if path.exists() else None
            except Exception:  # noqa: BLE001 - unreadable (truncated, foreign): recompute and rewrite it
                self._drop_shard()
        if self._open is not None:
            try:
                h = self._open.get_tensor(f"h{j}")
            except Exception:  # noqa: BLE001 - a damaged shard is a miss, never a failed evaluation
                h = None
            if h is not None and h.shape[0] == int(mask.sum()):
                self.hits += 1
                return self.scorer.score_from_prefix(h, Packing.of(mask))
            self._drop_shard()
        self.misses += 1
        h, pk = self.scorer.prefix(ids, mask)
        self._pending[f"h{j}"] = h.detach().contiguous()
        return self.scorer.score_from_prefix(h, pk)

    def _flush(self) -> None:
        """Write the shard just computed, if it is complete and the cache has room."""
        pending, self._pending, self._open = self._pending, {}, None
        if self._shard < 0 or not pending:
            return
        if len(pending) != self.sizes[self._shard]:  # a user was skipped: never write a partial shard
            return
        size = sum(t.numel() * t.element_size() for t in pending.values())
        if _dir_bytes(self.dir) + size > self.limit or shutil.disk_usage(self.dir).free < 2 * size + 2e9:
            return
        path = self._path(self._shard)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file(pending, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk: evaluation goes on without the shard
            Path(tmp).unlink(missing_ok=True)

    def _drop_shard(self) -> None:
        """Forget a damaged shard: this evaluation recomputes it and writes it again."""
        self._open = None
        self._pending = {}
        self._path(self._shard).unlink(missing_ok=True)

    def close(self) -> None:
        self._flush()
        self._shard = -1
