"""Build the `Engine` from settings: device, precision, backbone, checkpoints, catalogs, token cache (all the I/O).

Checkpoints (DESIGN 5.6, layout written by the training CLI):
  <artifacts>/xcross/<Domain>/   kind "xcross": the target model, naming its source LoRAs by content hash
  <artifacts>/lora/<Domain>/     kind "lora": a source LoRA (+ head)
A domain is served by `xcross/<Domain>` when present, else by `lora/<Domain>`; source LoRAs are looked up under
`lora/` and each is read once for all targets (`load_models`). A corrupt or mismatched checkpoint raises
`CheckpointError`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from model.backbone import Backbone, load_backbone
from model.checkpoint import CheckpointError, load_lora, load_model, read_manifest, single_stream
from model.lora import LoraWeights
from service.cache import TokenCache
from service.catalog import Catalogs
from service.engine import Engine, ServedModel, TorchRuntime, locked_encoder
from service.settings import Settings
from training.data import DOMAINS

log = logging.getLogger("service")

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class StartupError(RuntimeError):
    """The service cannot start with these settings; the message says what to change."""


def resolve_device(setting: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu; cuda without a GPU is an error."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise StartupError("XCROSS_DEVICE=cuda but torch sees no GPU; use XCROSS_DEVICE=auto or cpu")
    return setting


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The bf16 matmul flags this CPU advertises (empty when unknown)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def resolve_precision(setting: str, device: str, cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, str]:
    """(precision, why): auto = bf16 on CUDA and on CPUs with avx512_bf16 / amx_bf16, else fp32."""
    if setting != "auto":
        return setting, f"XCROSS_PRECISION={setting}"
    if device == "cuda":
        return "bf16", "auto: CUDA device"
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return "bf16", f"auto: CPU has {', '.join(flags)}"
    return "fp32", "auto: CPU has no avx512_bf16/amx_bf16"


def find_checkpoints(artifacts: Path) -> dict[str, Path]:
    """The checkpoint directory serving each domain: xcross/<Domain> if present, else lora/<Domain>."""
    found = {}
    for kind in ("xcross", "lora"):
        root = artifacts / kind
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if d.is_dir() and d.name not in DOMAINS:
                log.warning("ignoring %s: not a domain directory (domains: %s)", d, ", ".join(DOMAINS))
    for domain in DOMAINS:
        for kind in ("xcross", "lora"):
            d = artifacts / kind / domain
            if d.is_dir():  # a directory without a manifest is an interrupted save: load_model says so
                found[domain] = d
                break
    return found


def preflight(found: dict[str, Path], backbone: str) -> None:
    """Cheap checks before the (slow) backbone load: each manifest reads, and names the configured backbone."""
    for path in found.values():
        have = read_manifest(path)["backbone"]["name"]
        if have != backbone:
            raise CheckpointError(f"{path}: trained on backbone {have!r} but XCROSS_BACKBONE is {backbone!r}; "
                                  "serve it with that backbone or point XCROSS_ARTIFACTS at matching checkpoints")


def load_models(artifacts: Path, backbone: Backbone, device: str = "cpu") -> dict[str, ServedModel]:
    """Every served domain's model. LoRA domains load first and their adapters join the cache (by content hash)
    that X-Cross targets take their sources from, so each source LoRA file is read once."""
    loras: dict[str, LoraWeights] = {}
    found = find_checkpoints(artifacts)
    served = {}
    for domain in sorted(found, key=lambda d: found[d].parent.name != "lora"):
        path = found[domain]
        if read_manifest(path).get("kind") == "lora":
            lora, head, manifest = load_lora(path, backbone)
            lora = loras.setdefault(manifest["content_hash"], lora)
            model = single_stream(backbone, lora, head)
        else:
            model, manifest = load_model(path, backbone, search=[artifacts / "lora"], loras=loras)
        named = manifest.get("target") or manifest.get("domain")
        if named != domain:
            raise CheckpointError(f"{path}: the manifest is for domain {named!r} but the directory serves {domain}; "
                                  "move the checkpoint to the matching directory")
        served[domain] = ServedModel(domain, manifest["kind"], manifest["content_hash"], model.to(device).eval())
    return dict(sorted(served.items()))


def load_engine(settings: Settings) -> Engine:
    """Everything the service needs, loaded once; raises StartupError / CheckpointError with a clear message."""
    device = resolve_device(settings.device)
    precision, why = resolve_precision(settings.precision, device)
    artifacts = settings.artifacts
    found = find_checkpoints(artifacts)
    if not found and not settings.allow_empty:
        raise StartupError(f"no checkpoints under {artifacts} (expected xcross/<Domain>/ or lora/<Domain>/); train "
                           "them with the training CLI, point XCROSS_ARTIFACTS at them, or set XCROSS_ALLOW_EMPTY=1")
    preflight(found, settings.backbone)
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    backbone = load_backbone(settings.backbone)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if limit is not None and settings.max_len > limit:
        raise StartupError(f"XCROSS_MAX_LEN={settings.max_len} exceeds the backbone's {limit} positions")
    backbone.model.to(device)
    models = load_models(artifacts, backbone, device)
    catalogs = Catalogs.load(models, settings.data_dir)
    cache = TokenCache(locked_encoder(backbone.tokenizer), backbone.tokenizer_fingerprint, settings.redis_url,
                       lru_size=settings.cache_lru_size, ttl_s=settings.cache_ttl_s,
                       timeout_s=settings.cache_timeout_s, retry_s=settings.cache_retry_s)
    runtime = TorchRuntime({d: m.model for d, m in models.items()}, device, precision)
    log.info("serving %s on %s, precision %s (%s), %d threads, Redis %s",
             ", ".join(m.name for m in models.values()) or "nothing", device, precision, why,
             torch.get_num_threads(), "on" if settings.redis_url else "off")
    return Engine(backbone, models, catalogs, cache, runtime=runtime, max_len=settings.max_len,
                  max_history=settings.max_history, batch_prompts=settings.batch_prompts)

