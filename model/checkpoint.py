"""Checkpoints (DESIGN 5.6): a directory per artifact with safetensors tensors and a `manifest.json`.

- kind "lora": `tensors.safetensors` = LoRA A/B per module (`<module>.lora_A`, `.lora_B`) + head (`head.*`).
- kind "xcross": `tensors.safetensors` = integrators, w, head; the manifest names its source LoRAs by content hash
  (and a relative path hint). n_streams=1 with top_k=0 covers the Pooler+Scorer baseline and -Experts.
- kind "gca": as "xcross", with gated cross-attention integrators (`config.integrator == "gca"`, model/gca.py).
- kind "weaverec": as "lora", holding a merged adapter sum_i lambda_i s_i B_i A_i (ranks concatenated) and the
  lambda-merged head; the manifest records lambda and the merged components' content hashes (model/weaverec.py).
The manifest records backbone name + revision, tokenizer fingerprint, hyperparameters, metrics, the sha256 of
each file, and library versions. Loading verifies every hash and the backbone/tokenizer before building anything:
a missing, truncated or mismatched checkpoint raises `CheckpointError`, never returns a half-loaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.backbone import Backbone
from model.lora import LoraWeights
from model.xcross import Head, XCross, XCrossConfig

FORMAT = 1
TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the running backbone."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import peft
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "safetensors": safetensors.__version__}


def _write(directory: str | Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, d / TENSORS)
    digest = _sha256(d / TENSORS)
    manifest = {"format": FORMAT, **manifest, "files": {TENSORS: digest}, "content_hash": digest,
                "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(d / MANIFEST)  # the manifest lands last: a directory without one is not a checkpoint
    return d


def _backbone_meta(backbone: Backbone) -> dict[str, Any]:
    return {"backbone": {"name": backbone.name, "revision": backbone.revision},
            "tokenizer_fingerprint": backbone.tokenizer_fingerprint}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; not a checkpoint directory (or an interrupted save)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc}); the file is corrupt, re-export the checkpoint") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this code reads format {FORMAT}")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its sha256 (CheckpointError naming the file otherwise)."""
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing (the manifest lists it)")
        actual = _sha256(path)
        if actual != expected:
            raise CheckpointError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                "the file is truncated or modified: re-copy or re-train it"
            )


def _load_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    verify_files(directory, manifest)
    return load_file(directory / TENSORS)


def check_backbone(manifest: dict[str, Any], backbone: Backbone, where: str | Path) -> None:
    want, have = manifest["backbone"]["name"], backbone.name
    if want != have:
        raise CheckpointError(f"{where}: trained on backbone {want!r} but the running backbone is {have!r}")
    want, have = manifest["tokenizer_fingerprint"], backbone.tokenizer_fingerprint
    if want != have:
        raise CheckpointError(
            f"{where}: tokenizer fingerprint {want} (checkpoint) != {have} (running backbone); "
            "token ids would not mean the same thing"
        )


def _head_tensors(head: Head) -> dict[str, torch.Tensor]:
    return {f"head.{k}": v for k, v in head.state_dict().items()}


def _head_from(tensors: dict[str, torch.Tensor], d: int) -> Head:
    head = Head(d)
    head.load_state_dict({k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")})
    return head


# ---------------------------------------------------------------- source LoRAs


def save_lora(directory: str | Path, lora: LoraWeights, head: Head, backbone: Backbone, *, domain: str,
              lora_config: dict[str, Any], **extra: Any) -> Path:
    tensors = {**lora.state_dict(), **_head_tensors(head)}
    return _write(directory, tensors, {"kind": "lora", "domain": domain, "lora": {**lora_config, "scale": lora.scale},
                                       **_backbone_meta(backbone), **extra})


def _open(directory: str | Path, kind: str | tuple[str, ...], backbone: Backbone) -> tuple[Path, dict[str, Any], dict]:
    """Manifest, kind and backbone checks, then the hash-verified tensors."""
    d = Path(directory)
    manifest = read_manifest(d)
    kinds = (kind,) if isinstance(kind, str) else kind
    if manifest.get("kind") not in kinds:
        raise CheckpointError(f"{d}: kind {manifest.get('kind')!r}, expected {' or '.join(map(repr, kinds))}")
    check_backbone(manifest, backbone, d)
    return d, manifest, _load_tensors(d, manifest)


def load_lora(directory: str | Path, backbone: Backbone, kinds: tuple[str, ...] = ("lora",)
              ) -> tuple[LoraWeights, Head, dict[str, Any]]:
    d, manifest, tensors = _open(directory, kinds, backbone)
    lora = LoraWeights.from_state_dict({k: v for k, v in tensors.items() if not k.startswith("head.")},
                                       manifest["lora"]["scale"])
    missing = [m for m in lora.modules if not _has_module(backbone, m)]
    if missing:
        raise CheckpointError(f"{d}: LoRA modules not in the backbone: {missing[:3]}")
    return lora, _head_from(tensors, backbone.hidden_size), manifest


def _has_module(backbone: Backbone, path: str) -> bool:
    try:
        backbone.model.get_submodule(path)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------- WeaveRec merged adapters


def save_weaverec(directory: str | Path, lora: LoraWeights, head: Head, backbone: Backbone, *, target: str,
                  components: list[tuple[str, str | Path]], weights: list[float], **extra: Any) -> Path:
    """A merged adapter (`LoraWeights.merge`: sum_i lambda_i s_i B_i A_i, ranks concatenated) + the merged head.

    Self-contained (the merged tensors are stored); `components` (name, LoRA checkpoint dir) are recorded by
    content hash for provenance only."""
    refs = [{"name": name, "content_hash": read_manifest(path)["content_hash"]} for name, path in components]
    tensors = {**lora.state_dict(), **_head_tensors(head)}
    return _write(directory, tensors, {"kind": "weaverec", "target": target, "components": refs,
                                       "weights": [float(w) for w in weights], "lora": {"scale": lora.scale,
                                                                                        "rank": lora.rank},
                                       **_backbone_meta(backbone), **extra})


def load_weaverec(directory: str | Path, backbone: Backbone) -> tuple[LoraWeights, Head, dict[str, Any]]:
    return load_lora(directory, backbone, kinds=("weaverec",))


# ---------------------------------------------------------------- X-Cross models


def save_xcross(directory: str | Path, model: XCross, backbone: Backbone, *, target: str,
                sources: list[tuple[str, str | Path]], **extra: Any) -> Path:
    """`sources`: (domain, lora checkpoint dir) per stream, in stream order."""
    d = Path(directory)
    refs = []
    for domain, src in sources:
        m = read_manifest(src)
        rel = os.path.relpath(Path(src).resolve(), d.resolve())  # a hint; the content hash decides
        refs.append({"domain": domain, "content_hash": m["content_hash"], "path": rel})
    return _write(d, model.trainable_state_dict(), {"kind": model.config.kind, "target": target, "sources": refs,
                                                     "config": model.config.to_dict(), **_backbone_meta(backbone),
                                                     **extra})


def resolve_source(ref: dict[str, Any], xcross_dir: Path, search: list[Path]) -> Path:
    """Find the LoRA checkpoint with the referenced content hash: the path hint first, then `search` roots."""
    candidates = [xcross_dir / ref["path"]]
    for root in search:
        candidates += sorted(p.parent for p in Path(root).glob(f"**/{MANIFEST}"))
    for c in candidates:
        if (c / MANIFEST).is_file():
            try:
                if read_manifest(c).get("content_hash") == ref["content_hash"]:
                    return c
            except CheckpointError:
                continue
    raise CheckpointError(
        f"{xcross_dir}: source LoRA {ref['domain']} with content hash {ref['content_hash'][:12]}... not found "
        f"(looked at {ref['path']} and under {[str(s) for s in search]}); was the source LoRA re-trained?"
    )


def load_xcross(directory: str | Path, backbone: Backbone, search: list[str | Path] = (),
                loras: dict[str, LoraWeights] | None = None) -> tuple[XCross, dict[str, Any]]:
    """Build an X-Cross model; `loras` caches source LoRAs by content hash so services load each one once."""
    d, manifest, tensors = _open(directory, ("xcross", "gca"), backbone)
    cache = loras if loras is not None else {}
    streams = []
    for ref in manifest["sources"]:
        if ref["content_hash"] not in cache:
            cache[ref["content_hash"]] = load_lora(resolve_source(ref, d, [Path(s) for s in search]), backbone)[0]
        streams.append(cache[ref["content_hash"]])
    model = XCross(backbone, streams, XCrossConfig(**manifest["config"]))
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{d}: tensors do not fit the model ({exc})") from exc
    expected = set(model.trainable_state_dict())
    if set(tensors) != expected:
        raise CheckpointError(f"{d}: tensor names differ from the model's: missing {sorted(expected - set(tensors))}, "
                              f"unexpected {sorted(set(tensors) - expected)}")
    return model.eval(), manifest


def single_stream(backbone: Backbone, lora: LoraWeights, head: Head, pooling: str = "cls") -> XCross:
    """A source LoRA as a one-stream model (the fast serving path for kind 'lora')."""
    return XCross(backbone, [lora], XCrossConfig(n_streams=1, top_k=0, pooling=pooling), head=head).eval()


def lora_pooling(manifest: dict[str, Any]) -> str:
    """The head input a LoRA checkpoint was trained with ("cls" for checkpoints from before the option)."""
    return manifest.get("lora", {}).get("pooling", "cls")


def load_model(directory: str | Path, backbone: Backbone, search: list[str | Path] = (),
               loras: dict[str, LoraWeights] | None = None) -> tuple[XCross, dict[str, Any]]:
    """Any checkpoint kind as a scoring model."""
    manifest = read_manifest(directory)
    if manifest.get("kind") in ("lora", "weaverec"):  # one adapter: a single stream
        lora, head, manifest = load_lora(directory, backbone, kinds=(manifest["kind"],))
        return single_stream(backbone, lora, head, lora_pooling(manifest)), manifest
    return load_xcross(directory, backbone, search, loras)
