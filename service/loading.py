"""Build the `Engine` from settings: device, backend, backbone, checkpoints, catalogs, token cache (all the I/O).

Checkpoints (DESIGN 5.6, layout written by the training CLI):
  <artifacts>/xcross/<Domain>/   kind "xcross": the target model, naming its source LoRAs by content hash
  <artifacts>/weaverec/<Domain>/ kind "weaverec": one merged adapter (WeaveRec; costs what one LoRA costs)
  <artifacts>/gca/<Domain>/      kind "gca": X-Cross with gated cross-attention (served in the grouped torch form)
  <artifacts>/lora/<Domain>/     kind "lora": a source LoRA (+ head)
Every checkpoint found is served. A request picks one with its optional `model` field (a kind); without it, the
domain's default: the kind XCROSS_MODEL names when the domain has it, else the first of xcross, weaverec, gca,
lora that it has. Served models are keyed `<Domain>` (the default) and `<Domain>:<kind>` (the others): the batcher
and the runtime route by that key. Source LoRAs are looked up by content hash under `lora/`, then `sources/` (old
LoRAs that `training ship --keep-sources` kept for models not yet retrained) and `domains/`; each is read once for all
targets (`load_models`). A corrupt or mismatched checkpoint raises `CheckpointError`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from model.backbone import Backbone, load_backbone
from model.checkpoint import CheckpointError, load_lora, load_model, read_manifest, single_stream
from model.inference import optimize_for_inference, serve_bf16_
from model.lora import LoraWeights
from service.cache import TokenCache
from service.catalog import Catalogs
from service.engine import Engine, Runtime, ServedModel, TorchRuntime, locked_encoder
from service.machine import cpu_bf16_flags, tune_malloc
from service.settings import BACKEND_PRECISION, Settings
from service.text_recall import build_recall_stages, build_text_recall
from training.data import DOMAINS

log = logging.getLogger("service")


class StartupError(RuntimeError):
    """The service cannot start with these settings; the message says what to change."""


def resolve_device(setting: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu; cuda without a GPU is an error."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise StartupError("XCROSS_DEVICE=cuda but torch sees no GPU; use XCROSS_DEVICE=auto or cpu")
    return setting


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


def resolve_backend(backend: str, precision: str, device: str,
                    cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, str]:
    """(backend, why). auto: an explicit XCROSS_PRECISION picks torch / torch-bf16; else torch-bf16 on CUDA and
    on CPUs with bf16 matmul instructions (measured 2.5-3x fp32 on AMX, ~1.35x on avx512_bf16 alone, Hit@1
    within 0.5 points: docs/performance.md), else torch fp32 (ONNX Runtime fp32 measured no faster; int8 is
    offered, not chosen, until its Hit@1 change is measured on trained checkpoints)."""
    if backend == "onnx-int8" and device != "cpu":
        raise StartupError("XCROSS_BACKEND=onnx-int8 runs on the CPU only; on CUDA use onnx or torch-bf16")
    if backend != "auto":
        return backend, f"XCROSS_BACKEND={backend}"
    if precision != "auto":
        return ("torch-bf16" if precision == "bf16" else "torch"), f"auto: XCROSS_PRECISION={precision}"
    resolved, why = resolve_precision("auto", device, cpuinfo)
    return ("torch-bf16" if resolved == "bf16" else "torch"), why


KINDS = ("xcross", "weaverec", "gca", "lora")  # the served checkpoint kinds, in default order


def find_all_checkpoints(artifacts: Path) -> dict[str, dict[str, Path]]:
    """Every served checkpoint directory: domain -> kind -> <artifacts>/<kind>/<Domain>, kinds in KINDS order."""
    for kind in KINDS:
        root = artifacts / kind
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if d.is_dir() and d.name not in DOMAINS:
                log.warning("ignoring %s: not a domain directory (domains: %s)", d, ", ".join(DOMAINS))
    found: dict[str, dict[str, Path]] = {}
    for domain in DOMAINS:
        for kind in KINDS:
            d = artifacts / kind / domain
            if d.is_dir():  # a directory without a manifest is an interrupted save: load_model says so
                found.setdefault(domain, {})[kind] = d
    for domain, root in onboarded_domains(artifacts).items():  # artifacts/domains/<NAME>/<kind>/ (issue 19)
        for kind in KINDS:
            if (root / kind).is_dir():
                found.setdefault(domain, {})[kind] = root / kind
    return found


ONBOARDED = "domains"  # <artifacts>/domains/<NAME>/: catalog.jsonl + xcross/ (+ lora/), by `python -m training onboard`
KEPT_SOURCES = "sources"  # <artifacts>/sources/<D>-<hash12>/: old LoRAs kept by `training ship --keep-sources`


def onboarded_domains(artifacts: Path) -> dict[str, Path]:
    """Onboarded domains (training/onboard.py): name -> directory holding catalog.jsonl and the checkpoints.
    Dot-directories are onboarding runs still being written (or the previous state being replaced): skipped."""
    root = artifacts / ONBOARDED
    found = {}
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name.startswith(".") or not d.is_dir():
            continue
        if d.name in DOMAINS:
            log.warning("ignoring %s: %s is a built-in domain (served from <artifacts>/<kind>/%s)", d, d.name, d.name)
        elif not (d / "catalog.jsonl").is_file():
            log.warning("ignoring %s: no catalog.jsonl (not written by `python -m training onboard`)", d)
        else:
            found[d.name] = d
    return found


def load_catalogs(domains: list[str], artifacts: Path, data_dir: Path | None) -> Catalogs:
    """The served domains' catalogs: onboarded ones from their artifact directory (no data directory needed),
    the built-in ones from the amazon-xcross data."""
    from service.catalog import CatalogError
    from training.data import read_catalog

    onboarded = onboarded_domains(artifacts)
    builtin = Catalogs.load([d for d in domains if d not in onboarded], data_dir)
    catalogs = {d: builtin[d] for d in builtin.domains}
    for d in domains:
        if d in onboarded:
            path = onboarded[d] / "catalog.jsonl"
            try:
                catalogs[d] = read_catalog(path, d)
            except (ValueError, KeyError, OSError) as exc:
                raise CatalogError(f"{path}: unreadable catalog ({exc}); onboard the domain again") from exc
    return Catalogs(catalogs)


def default_kind(kinds: dict[str, Path] | list[str], prefer: str = "auto") -> str:
    """The kind serving a domain by default: `prefer` when the domain has it, else the first in KINDS order."""
    if prefer != "auto" and prefer in kinds:
        return prefer
    return next(k for k in KINDS if k in kinds)


def find_checkpoints(artifacts: Path, prefer: str = "auto") -> dict[str, Path]:
    """The checkpoint directory serving each domain by default (xcross/<Domain> first, lora/<Domain> last)."""
    return {domain: kinds[default_kind(kinds, prefer)] for domain, kinds in find_all_checkpoints(artifacts).items()}


def preflight(found: dict[str, Path], backbone: str) -> None:
    """Cheap checks before the (slow) backbone load: each manifest reads, and names the configured backbone."""
    for path in found.values():
        have = read_manifest(path)["backbone"]["name"]
        if have != backbone:
            raise CheckpointError(f"{path}: trained on backbone {have!r} but XCROSS_BACKBONE is {backbone!r}; "
                                  "serve it with that backbone or point XCROSS_ARTIFACTS at matching checkpoints")


def load_models(artifacts: Path, backbone: Backbone, device: str = "cpu",
                streamwise: bool | None = None, prefer: str = "auto") -> dict[str, ServedModel]:
    """Every served model, in its inference form (model.inference), keyed `<Domain>` for the domain's default
    (`prefer`, see `default_kind`) and `<Domain>:<kind>` for the others. `streamwise` (default: on the CPU) runs
    the streams one after another with merged LoRAs, else they stay folded in the batch (GPU, ONNX export); GCA
    models always stay folded (the streamwise form implements eq. 5 only). A WeaveRec checkpoint is one merged
    adapter: a single stream, merged into W, so it costs exactly what a LoRA costs.
    LoRA checkpoints load first and their adapters join the cache (by content hash) that X-Cross targets take
    their sources from, so each source LoRA file is read once."""
    streamwise = device == "cpu" if streamwise is None else streamwise
    loras: dict[str, LoraWeights] = {}
    found = find_all_checkpoints(artifacts)
    entries = [(d, kind, path, kind == default_kind(kinds, prefer))
               for d, kinds in found.items() for kind, path in kinds.items()]
    served = {}
    for domain, kind, path, is_default in sorted(entries, key=lambda e: (e[1] != "lora", e[0], KINDS.index(e[1]))):
        if read_manifest(path).get("kind") == "lora":
            lora, head, manifest = load_lora(path, backbone)
            lora = loras.setdefault(manifest["content_hash"], lora)
            model = single_stream(backbone, lora, head)
        else:
            model, manifest = load_model(path, backbone, search=[artifacts / "lora", artifacts / KEPT_SOURCES,
                                                                        artifacts / ONBOARDED],
                                         loras=loras)
        named = manifest.get("target") or manifest.get("domain")
        if named != domain:
            raise CheckpointError(f"{path}: the manifest is for domain {named!r} but the directory serves {domain}; "
                                  "move the checkpoint to the matching directory")
        if manifest["kind"] != kind:
            raise CheckpointError(f"{path}: a {manifest['kind']!r} checkpoint in the {kind}/ directory; move it to "
                                  f"{manifest['kind']}/{domain}")
        model = optimize_for_inference(model.to(device), streamwise=streamwise)
        key = domain if is_default else f"{domain}:{kind}"
        served[key] = ServedModel(domain, manifest["kind"], manifest["content_hash"], model)
    return dict(sorted(served.items()))


def source_hashes(artifacts: Path, domain: str, kind: str | None = None) -> list[str]:
    """Content hashes of an X-Cross (or GCA) checkpoint's source LoRAs (none for a LoRA or WeaveRec checkpoint);
    `kind` None: the domain's default checkpoint."""
    kinds = find_all_checkpoints(artifacts).get(domain, {})
    path = kinds.get(kind) if kind is not None else (kinds[default_kind(kinds)] if kinds else None)
    manifest = read_manifest(path) if path is not None else {}
    return [ref["content_hash"] for ref in manifest.get("sources", [])]


def build_runtime(backend: str, models: dict[str, ServedModel], settings: Settings, backbone: Backbone,
                  device: str) -> Runtime:
    """The runtime of a resolved backend; torch-bf16 prepares the models with `serve_bf16_` first (bf16 weights;
    bf16 activations end to end in the packed streamwise form)."""
    torch_models = {d: m.model for d, m in models.items()}
    if backend == "torch":
        return TorchRuntime(torch_models, device, "fp32", backend=backend)
    if backend == "torch-bf16":
        for model in torch_models.values():
            serve_bf16_(model)
        return TorchRuntime(torch_models, device, "bf16", backend=backend)
    gca = sorted(key for key, m in models.items() if m.kind == "gca")
    if gca:
        raise StartupError(f"XCROSS_BACKEND={backend}: GCA checkpoints ({', '.join(gca)}) are served by the torch "
                           "backends only; use XCROSS_BACKEND=torch or torch-bf16, or move artifacts/gca/ away")
    from service.runtimes import build_onnx_runtime

    sources = {key: source_hashes(settings.artifacts, m.domain, m.kind) for key, m in models.items()}
    return build_onnx_runtime(models, sources, f"{backbone.name}@{backbone.revision}", settings.onnx_cache,
                              backend, device, torch.get_num_threads())


def redis_state(url: str | None, timeout_s: float = 0.5) -> str:
    """One phrase for the start-up log: off (no REDIS_URL), ok or down at the URL (credentials left out)."""
    if url is None:
        return "off (REDIS_URL unset: in-process token cache only)"
    from urllib.parse import urlparse

    import redis

    u = urlparse(url)
    where = f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping()
    except redis.RedisError as exc:
        return f"down at {where} ({type(exc).__name__}): serving without it, retried while serving"
    return f"ok at {where} (token cache shared with the other replicas)"


def startup_summary(models: dict[str, ServedModel], settings: Settings, device: str, backend: str, why: str,
                    malloc: bool) -> list[str]:
    """What the service serves, in a few lines of its own (logged at start by `load_engine`)."""
    domains: dict[str, list[str]] = {}
    for key, m in sorted(models.items()):
        domains.setdefault(m.domain, [])
        if key == m.domain:  # the domain's default kind first
            domains[m.domain].insert(0, m.kind)
        else:
            domains[m.domain].append(m.kind)
    kinds = "; ".join(f"{d}: {', '.join(k)}" for d, k in domains.items()) or "nothing"
    lines = [f"serving {len(domains)} domains ({kinds}; the first kind is the default, XCROSS_MODEL="
             f"{settings.model}) from {settings.artifacts}",
             "models: " + (", ".join(m.name for _, m in sorted(models.items())) or "none"),
             f"device {device}, backend {backend} ({BACKEND_PRECISION[backend]}; {why}), "
             f"{torch.get_num_threads()} threads, malloc tuning {'on' if malloc else 'off'}",
             f"Redis {redis_state(settings.redis_url, settings.cache_timeout_s * 10)}"]
    return lines


def load_engine(settings: Settings) -> Engine:
    """Everything the service needs, loaded once; raises StartupError / CheckpointError with a clear message."""
    device = resolve_device(settings.device)
    backend, why = resolve_backend(settings.backend, settings.precision, device)
    malloc = settings.tune_malloc and tune_malloc()
    artifacts = settings.artifacts
    found = find_checkpoints(artifacts, settings.model)
    if not found and not settings.allow_empty:
        raise StartupError(f"no checkpoints under {artifacts} (expected xcross/<Domain>/ or lora/<Domain>/); train "
                           "them with the training CLI, point XCROSS_ARTIFACTS at them, or set XCROSS_ALLOW_EMPTY=1")
    preflight({f"{d}:{k}": p for d, kinds in find_all_checkpoints(artifacts).items() for k, p in kinds.items()},
              settings.backbone)
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    backbone = load_backbone(settings.backbone)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if limit is not None and settings.max_len > limit:
        raise StartupError(f"XCROSS_MAX_LEN={settings.max_len} exceeds the backbone's {limit} positions")
    backbone.model.to(device)
    models = load_models(artifacts, backbone, device, streamwise=device == "cpu" and backend.startswith("torch"),
                         prefer=settings.model)
    catalogs = load_catalogs(sorted({m.domain for m in models.values()}), artifacts, settings.data_dir)
    cache = TokenCache(locked_encoder(backbone.tokenizer), backbone.tokenizer_fingerprint, settings.redis_url,
                       lru_size=settings.cache_lru_size, ttl_s=settings.cache_ttl_s,
                       timeout_s=settings.cache_timeout_s, retry_s=settings.cache_retry_s)
    # text recall (issue 20): catalog embeddings by the plain backbone, before build_runtime may cast it to bf16
    recall = (build_text_recall(backbone, catalogs, catalogs.domains, settings.recall_index, settings.recall_cache)
              if settings.recall_n > 0 else {})
    recall = build_recall_stages(recall, artifacts / "recall", settings.recall_mode)  # item-id recall where trained
    runtime = build_runtime(backend, models, settings, backbone, device)
    for line in startup_summary(models, settings, device, backend, why, malloc):
        log.info("%s", line)
    return Engine(backbone, models, catalogs, cache, runtime=runtime, max_len=settings.max_len,
                  max_history=settings.max_history, batch_prompts=settings.batch_prompts, recall=recall,
                  recall_n=settings.recall_n)



# --- reload (issue 19): a complete new served state from disk, validated before it is swapped in --------------


class ReloadError(RuntimeError):
    """The new state could not be built or failed validation; the old one keeps serving."""


def validate_engine(engine: Engine) -> None:
    """One real request per served model (history and candidates from its catalog) must score finite numbers."""
    import math

    for req in engine.warmup_requests(candidates=4, history=3):  # one per served model
        resp = engine.recommend(req)
        bad = [it.score for it in resp.items if not math.isfinite(it.score)]
        if bad or not resp.items:
            raise ReloadError(f"{req.domain} ({req.model or 'default'}): the new model scores {bad[:3] or 'nothing'}")


def served_summary(engine: Engine | None) -> dict[str, str]:
    """`<model key>` -> `<kind>@<content hash>` of what an engine serves."""
    if engine is None:
        return {}
    return {key: f"{m.kind}@{m.sha}" for key, m in sorted(engine.models.items())}


def engine_changes(old: Engine | None, new: Engine) -> dict[str, list[str]]:
    a, b = served_summary(old), served_summary(new)
    return {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
            "changed": sorted(k for k in set(a) & set(b) if a[k] != b[k]),
            "unchanged": sorted(k for k in set(a) & set(b) if a[k] == b[k])}


def reload_engine(settings: Settings) -> Engine:
    """The served state rebuilt from disk (backbone, checkpoints, catalogs, runtime) and validated; any failure is
    a ReloadError naming the cause (the caller keeps its current engine)."""
    try:
        engine = load_engine(settings)
    except Exception as exc:  # noqa: BLE001 - StartupError, CheckpointError, CatalogError, torch's errors alike
        raise ReloadError(f"reload refused, still serving the previous models: {' '.join(str(exc).split())}") from exc
    try:
        validate_engine(engine)
    except Exception as exc:  # noqa: BLE001 - any failure of the new state refuses it
        engine.close()
        raise ReloadError(f"reload refused, still serving the previous models: {exc}") from exc
    return engine
